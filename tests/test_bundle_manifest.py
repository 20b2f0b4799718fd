"""The manifest is written byte for byte as ec2-ami-tools writes it, and read whatever
the writer's quoting and declaration."""

from __future__ import annotations

import pytest

from builder.bundle.manifest import Manifest, ManifestPart, parse, render, signed_portion
from builder.core.errors import BakeError

SIG = "5" * 512


def example(**over) -> Manifest:
    kw = dict(
        name="example.img", user="123456789012", image_type="machine", arch="x86_64",
        digest="6bb95ea90c8e4c838ec71da85f93c778090c9d70", size=1253376, bundled_size=207040,
        ec2_encrypted_key="e1" * 4, user_encrypted_key="u1" * 4, ec2_encrypted_iv="e2" * 4, user_encrypted_iv="u2" * 4,
        parts=[ManifestPart(0, "example.img.part.00", "0f90be6df489764ed3094b9f7e9b1abde3ea7ebc"),
               ManifestPart(1, "example.img.part.01", "17cd8a3da2cd098f997b295dfa47318064740dca")],
        kernel_id="eki-00000001", ramdisk_id="eri-00000001",
        block_device_mapping={"swap": "sda3", "root": "/dev/sda1", "ami": "sda1", "ephemeral0": "sda2"},
        bundler_name="example", bundler_version="0.1", bundler_release="0",
    )
    kw.update(over)
    return Manifest(**kw)


EXPECTED = (
    "<?xml version='1.0'?><manifest><version>2007-10-10</version><bundler><name>example</name><version>0.1</version>"
    "<release>0</release></bundler><machine_configuration><architecture>x86_64</architecture><block_device_mapping>"
    "<mapping><virtual>ami</virtual><device>sda1</device></mapping><mapping><virtual>ephemeral0</virtual>"
    "<device>sda2</device></mapping><mapping><virtual>root</virtual><device>/dev/sda1</device></mapping><mapping>"
    "<virtual>swap</virtual><device>sda3</device></mapping></block_device_mapping><kernel_id>eki-00000001</kernel_id>"
    "<ramdisk_id>eri-00000001</ramdisk_id></machine_configuration><image><name>example.img</name>"
    "<user>123456789012</user><type>machine</type><digest algorithm='SHA1'>6bb95ea90c8e4c838ec71da85f93c778090c9d70"
    "</digest><size>1253376</size><bundled_size>207040</bundled_size><ec2_encrypted_key algorithm='AES-128-CBC'>"
    "e1e1e1e1</ec2_encrypted_key><user_encrypted_key algorithm='AES-128-CBC'>u1u1u1u1</user_encrypted_key>"
    "<ec2_encrypted_iv>e2e2e2e2</ec2_encrypted_iv><user_encrypted_iv>u2u2u2u2</user_encrypted_iv><parts count='2'>"
    "<part index='0'><filename>example.img.part.00</filename><digest algorithm='SHA1'>"
    "0f90be6df489764ed3094b9f7e9b1abde3ea7ebc</digest></part><part index='1'><filename>example.img.part.01</filename>"
    "<digest algorithm='SHA1'>17cd8a3da2cd098f997b295dfa47318064740dca</digest></part></parts></image>"
    f"<signature>{SIG}</signature></manifest>"
).encode()


def test_manifest_is_written_byte_for_byte_in_the_ec2_ami_tools_form():
    signed = []
    text = render(example(), lambda data: signed.append(data) or SIG)
    assert text == EXPECTED
    assert b"\n" not in text
    # the signature covers exactly <machine_configuration>…</machine_configuration><image>…</image>
    assert signed == [signed_portion(text)]
    assert signed[0].startswith(b"<machine_configuration>") and signed[0].endswith(b"</image>")


def test_kernel_manifest_has_type_after_user_kernel_name_and_no_mappings():
    m = example(image_type="kernel", kernel_id="true", ramdisk_id=None, block_device_mapping={}, kernel_name="vmlinuz")
    text = render(m, lambda data: SIG).decode()
    assert "<machine_configuration><architecture>x86_64</architecture><kernel_id>true</kernel_id></machine_configuration>" in text
    assert "<user>123456789012</user><type>kernel</type><kernel_name>vmlinuz</kernel_name><digest " in text


def test_product_codes_come_last_in_machine_configuration():
    text = render(example(product_codes=["ABCD1234"]), lambda data: SIG).decode()
    assert ("<ramdisk_id>eri-00000001</ramdisk_id><product_codes><product_code>ABCD1234</product_code>"
            "</product_codes></machine_configuration>") in text


def test_written_manifest_parses_back_to_the_same_fields():
    m = parse(EXPECTED)
    assert (m.name, m.user, m.image_type, m.arch, m.kernel_id, m.ramdisk_id) == (
        "example.img", "123456789012", "machine", "x86_64", "eki-00000001", "eri-00000001")
    assert (m.size, m.bundled_size, m.digest) == (1253376, 207040, "6bb95ea90c8e4c838ec71da85f93c778090c9d70")
    assert m.block_device_mapping == {"ami": "sda1", "ephemeral0": "sda2", "root": "/dev/sda1", "swap": "sda3"}
    assert [(p.index, p.filename) for p in m.parts] == [(0, "example.img.part.00"), (1, "example.img.part.01")]
    assert (m.ec2_encrypted_key, m.user_encrypted_iv, m.signature) == ("e1" * 4, "u2" * 4, SIG)
    assert m.signed_bytes == signed_portion(EXPECTED)


def test_double_quotes_another_declaration_and_parts_out_of_order_are_read():
    text = EXPECTED.decode().replace("'", '"').replace('<?xml version="1.0"?>', "<?xml version='1.0' encoding='ASCII'?>\n")
    first = "<part index=\"0\"><filename>example.img.part.00</filename><digest algorithm=\"SHA1\">0f90be6df489764ed3094b9f7e9b1abde3ea7ebc</digest></part>"
    assert first in text
    text = text.replace(first, "").replace("</part></parts>", "</part>" + first + "</parts>")
    m = parse(text.encode())
    assert [p.filename for p in m.parts] == ["example.img.part.00", "example.img.part.01"]


@pytest.mark.parametrize("edit, message", [
    (("<version>2007-10-10</version>", "<version>2014-01-14</version>"), "version '2014-01-14' is not supported"),
    (("<size>1253376</size>", "<size>big</size>"), r"<image/size> is 'big', not a number"),
    (("<parts count='2'>", "<parts count='3'>"), r"count='3'.* but 2 <part> elements"),
    (("<part index='1'>", "<part index='7'>"), r"part indexes \[0, 7\] are not 0..1"),
    (("<name>example.img</name>", "<name>../x</name>"), "image name '../x' is not a plain file name"),
    (("</manifest>", ""), "not well-formed XML"),
])
def test_malformed_manifests_are_refused_with_the_reason(edit, message):
    with pytest.raises(BakeError, match=message):
        parse(EXPECTED.replace(edit[0].encode(), edit[1].encode(), 1))


def test_entity_declarations_are_refused():
    bomb = b"<?xml version='1.0'?><!DOCTYPE m [<!ENTITY a 'aaaa'>]><manifest>&a;</manifest>"
    with pytest.raises(BakeError, match="document type declarations are not allowed"):
        parse(bomb)


def test_non_ascii_values_are_refused():
    with pytest.raises(BakeError, match="manifest values must be ASCII"):
        render(example(kernel_id="eki-é"), lambda data: SIG)
