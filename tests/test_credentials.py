"""Credentials come from an eucarc, the environment or the recipe, and never show a secret."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from builder.cloud.clients import make_clients, signatures_for
from builder.cloud.credentials import Credentials, load_credentials, parse_eucarc
from builder.core.errors import BakeError

SECRET = "s3cr3t/Key+With=Odd&Chars"

EUCARC = """\
EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)
export EC2_URL=http://clc.example:8773/services/Eucalyptus
export S3_URL=http://walrus.example:8773/services/Walrus
echo WARN:  Euare service URL is not configured. >&2
export EC2_PRIVATE_KEY=${EUCA_KEY_DIR}/euca2-admin-1234abcd-pk.pem
export EC2_CERT=${EUCA_KEY_DIR}/euca2-admin-1234abcd-cert.pem
export EC2_JVM_ARGS=-Djavax.net.ssl.trustStore=${EUCA_KEY_DIR}/jssecacerts
export EUCALYPTUS_CERT=${EUCA_KEY_DIR}/cloud-cert.pem
export EC2_ACCOUNT_NUMBER='123456789012'
export EC2_ACCESS_KEY='AKIDFROMEUCARC01'
export EC2_SECRET_KEY='%s'
export AWS_ACCESS_KEY='AKIDFROMEUCARC01'
export AWS_SECRET_KEY='%s'
export EC2_USER_ID='123456789012'
alias ec2-upload-bundle="ec2-upload-bundle -a ${EC2_ACCESS_KEY} -s ${EC2_SECRET_KEY} --url ${S3_URL}"
""" % (SECRET, SECRET)


@pytest.fixture
def eucarc(tmp_path) -> Path:
    d = tmp_path / "creds"
    d.mkdir()
    p = d / "eucarc"
    p.write_text(EUCARC)
    return p


def test_eucarc_expands_euca_key_dir_and_ignores_warn_lines_and_aliases(eucarc):
    v = parse_eucarc(eucarc)
    key_dir = str(eucarc.parent.resolve())
    assert v["EC2_PRIVATE_KEY"] == f"{key_dir}/euca2-admin-1234abcd-pk.pem"
    assert v["EUCALYPTUS_CERT"] == f"{key_dir}/cloud-cert.pem"
    assert v["EC2_SECRET_KEY"] == SECRET
    assert v["EC2_USER_ID"] == "123456789012"
    assert not any(k.startswith(("echo", "alias", "WARN")) for k in v)
    assert "ec2-upload-bundle" not in v


def test_credentials_from_an_eucarc(clean_env, eucarc):
    c = load_credentials({"eucarc": str(eucarc)})
    assert c.ec2_url == "http://clc.example:8773/services/Eucalyptus"
    assert c.s3_url == "http://walrus.example:8773/services/Walrus"
    assert (c.access_key, c.secret_key, c.user_id) == ("AKIDFROMEUCARC01", SECRET, "123456789012")
    assert c.cert == eucarc.parent.resolve() / "euca2-admin-1234abcd-cert.pem"
    assert c.profile_version == "3"


def test_credentials_from_the_environment_with_aws_fallback_names(clean_env):
    clean_env.setenv("EC2_URL", "http://h:8773/services/compute")
    clean_env.setenv("S3_URL", "http://h:8773/services/objectstorage")
    clean_env.setenv("AWS_ACCESS_KEY", "AKIDENV")
    clean_env.setenv("AWS_SECRET_KEY", SECRET)
    clean_env.setenv("EC2_CERT", "/k/cert.pem")
    c = load_credentials(None)
    assert (c.access_key, c.secret_key, c.cert) == ("AKIDENV", SECRET, Path("/k/cert.pem"))
    assert c.source == "environment"
    assert c.profile_version == "4.0-4.3"   # object storage SigV4 only when 4.4+ is said


def test_the_recipe_section_names_urls_and_key_variables(clean_env, eucarc):
    clean_env.setenv("MY_SECRET", "other-secret")
    clean_env.setenv("MY_ACCESS", "AKIDRECIPE")
    c = load_credentials({"eucarc": str(eucarc), "ec2_url": "https://clc2:8773/services/compute/",
                          "access_key_env": "MY_ACCESS", "secret_key_env": "MY_SECRET",
                          "eucalyptus_version": "4.2"})
    assert c.ec2_url == "https://clc2:8773/services/compute"
    assert (c.access_key, c.secret_key) == ("AKIDRECIPE", "other-secret")
    assert c.s3_url == "http://walrus.example:8773/services/Walrus"
    assert c.profile_version == "4.0-4.3"


def test_a_key_variable_the_recipe_names_but_is_unset_is_an_error_without_values(clean_env, eucarc):
    with pytest.raises(BakeError, match=r"\$NOPE, which is not set"):
        load_credentials({"eucarc": str(eucarc), "secret_key_env": "NOPE"})


def test_no_cloud_configured_gives_none(clean_env):
    assert load_credentials({}) is None
    assert load_credentials(None, environ={}) is None


def test_half_configured_names_what_is_missing_and_never_the_secret(clean_env):
    clean_env.setenv("EC2_URL", "http://h:8773/services/Eucalyptus")
    clean_env.setenv("EC2_SECRET_KEY", SECRET)
    with pytest.raises(BakeError) as e:
        load_credentials({})
    assert "S3_URL" in str(e.value) and "EC2_ACCESS_KEY" in str(e.value)
    assert SECRET not in str(e.value)


def test_a_missing_eucarc_is_a_clear_error(clean_env, tmp_path):
    with pytest.raises(BakeError, match="cannot read the eucarc"):
        load_credentials({"eucarc": str(tmp_path / "nope")})


def test_repr_str_and_describe_hide_the_secret(clean_env, eucarc, caplog):
    c = load_credentials({"eucarc": str(eucarc)})
    for text in (repr(c), str(c), f"{c}", str(c.describe())):
        assert SECRET not in text
        assert "AKIDFROMEUCARC01" not in text   # the access key is shown masked
    assert "<hidden>" in repr(c)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("bake").debug("using %s / %r", c, c)
    assert SECRET not in caplog.text


def test_bundling_needs_the_certificates_and_says_which_are_missing(clean_env):
    c = Credentials("http://h/services/Eucalyptus", "http://h/services/Walrus", "AK", SECRET)
    with pytest.raises(BakeError) as e:
        c.require_bundling()
    assert "EC2_CERT" in str(e.value) and "EUCALYPTUS_CERT" in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize("version,ec2,s3", [
    ("3", "v2", "s3"), ("3.4.2", "v2", "s3"), ("4.0", "v4", "s3"), ("4.3.1", "v4", "s3"), ("4", "v4", "s3"),
    ("4.4", "v4", "s3v4"), ("4.4.2", "v4", "s3v4"), ("5", "v4", "s3v4"),
])
def test_signatures_follow_the_eucalyptus_version(version, ec2, s3):
    c = Credentials("http://h/services/Eucalyptus", "http://h/services/Walrus", "AK", SECRET,
                    eucalyptus_version=version)
    assert signatures_for(c.profile_version) == (ec2, s3)
    clients = make_clients(c)
    assert clients.ec2.meta.config.signature_version == ec2
    assert clients.s3.meta.config.signature_version == s3


def test_clients_are_path_style_without_checksums_or_client_retries_for_uploads():
    c = Credentials("http://h:8773/services/Eucalyptus", "http://h:8773/services/Walrus", "AK", SECRET)
    s3 = make_clients(c).s3
    cfg = s3.meta.config
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.retries["total_max_attempts"] == 1


def test_an_unreachable_cloud_is_a_clear_error_before_anything_is_bundled(tmp_path):
    from builder.cloud.publish import publish
    from eucalyptus_standin.trio import make_build

    build = make_build(tmp_path / "output")
    for name in ("cert.pem", "pk.pem", "cloud-cert.pem"):
        (tmp_path / name).write_text("not used: the cloud is asked first\n")
    c = Credentials("http://127.0.0.1:9/services/Eucalyptus", "http://127.0.0.1:9/services/Walrus", "AKIDX", SECRET,
                    user_id="123456789012", cert=tmp_path / "cert.pem", private_key=tmp_path / "pk.pem",
                    cloud_cert=tmp_path / "cloud-cert.pem")
    with pytest.raises(BakeError) as e:
        publish(build, c)
    assert "cannot reach the cloud" in str(e.value) and SECRET not in str(e.value)
    assert not (build.dir / "bundle").exists()


def test_a_build_with_nothing_to_publish_is_said_before_the_cloud_is_asked(tmp_path):
    from builder.core.record import Build
    from builder.cloud.publish import publish

    build = Build.create(tmp_path, "x")
    c = Credentials("http://127.0.0.1:9/services/Eucalyptus", "http://127.0.0.1:9/services/Walrus", "AKIDX", SECRET)
    with pytest.raises(BakeError, match=r"this build has no image \(stage not run\?\)$"):
        publish(build, c)


def test_a_named_eucarc_that_sets_no_cloud_variable_is_named_with_what_it_lacks(clean_env, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_text("garbage\n")
    with pytest.raises(BakeError) as e:
        load_credentials({}, eucarc=garbage)
    assert str(e.value).startswith(f"{garbage}: this eucarc sets none of EC2_URL, S3_URL, EC2_ACCESS_KEY, "
                                   "EC2_SECRET_KEY")


def test_a_named_eucarc_missing_some_variables_names_them_and_never_the_secret(clean_env, tmp_path):
    rc = tmp_path / "eucarc"
    rc.write_text(f"export EC2_URL=http://h:8773/services/Eucalyptus\nexport EC2_SECRET_KEY='{SECRET}'\n")
    with pytest.raises(BakeError) as e:
        load_credentials({"eucarc": str(rc)})
    assert str(e.value).startswith(f"{rc}: this eucarc does not set S3_URL, EC2_ACCESS_KEY (")
    assert SECRET not in str(e.value)


def test_a_named_eucarc_is_not_completed_from_another_clouds_environment(clean_env, tmp_path):
    clean_env.setenv("S3_URL", "http://other:8773/services/Walrus")
    clean_env.setenv("EC2_ACCESS_KEY", "AKIDOTHER")
    rc = tmp_path / "eucarc"
    rc.write_text(f"export EC2_URL=http://h:8773/services/Eucalyptus\nexport EC2_SECRET_KEY='{SECRET}'\n")
    with pytest.raises(BakeError, match="this eucarc does not set S3_URL, EC2_ACCESS_KEY"):
        load_credentials({}, eucarc=rc)


def test_the_recipe_may_complete_a_named_eucarc(clean_env, tmp_path):
    clean_env.setenv("MY_ACCESS", "AKIDRECIPE")
    rc = tmp_path / "eucarc"
    rc.write_text(f"export EC2_URL=http://h:8773/services/Eucalyptus\nexport EC2_SECRET_KEY='{SECRET}'\n")
    c = load_credentials({"eucarc": str(rc), "s3_url": "http://h:8773/services/Walrus", "access_key_env": "MY_ACCESS"})
    assert (c.s3_url, c.access_key, c.secret_key) == ("http://h:8773/services/Walrus", "AKIDRECIPE", SECRET)


def test_bundling_certificates_may_still_come_from_the_environment_beside_a_named_eucarc(clean_env, eucarc, tmp_path):
    trimmed = tmp_path / "trimmed-eucarc"
    trimmed.write_text("".join(line + "\n" for line in eucarc.read_text().splitlines()
                               if "EC2_CERT" not in line))
    clean_env.setenv("EC2_CERT", "/k/cert.pem")
    assert load_credentials({"eucarc": str(trimmed)}).cert == Path("/k/cert.pem")
