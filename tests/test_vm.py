"""The parts of a local instance that need no guest: the node-style disk, overlays,
the metadata service, the QMP channel and the accelerator choice."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time

import pytest

from builder.core import sh
from builder.vm import accel, disk, metadata
from builder.vm.console import Console, GuestTimeout

MiB = 1 << 20


@pytest.fixture
def small_image(tmp_path):
    img = tmp_path / "image"
    with open(img, "wb") as f:
        f.truncate(40 * MiB + 4096)  # not a whole number of MiB: partition 1 is rounded up
    sh.run(["mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs", img])
    return img


def _sha(path, offset, length):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        h.update(f.read(length))
    return h.hexdigest()


def test_node_disk_has_image_ephemeral_ext3_and_swap_like_the_node(small_image, tmp_path):
    t = disk.instance_type("m1.small")
    d = disk.node_disk(small_image, tmp_path / "disk.raw", t)
    table = json.loads(sh.output(["sfdisk", "-J", d]))["partitiontable"]
    assert table["label"] == "dos"
    p1, p2, p3 = table["partitions"]
    assert (p1["type"], p2["type"], p3["type"]) == ("83", "83", "82")
    assert p1["start"] == 2048
    assert d.stat().st_size == 5 << 30  # m1.small: 5 GB in all
    size = small_image.stat().st_size
    assert _sha(d, p1["start"] * 512, size) == _sha(small_image, 0, size)
    eph = sh.output(["blkid", "-p", "-O", str(p2["start"] * 512), "-o", "export", d])
    assert "TYPE=ext3" in eph and "LABEL=ephemeral0" in eph
    swap = sh.output(["blkid", "-p", "-O", str(p3["start"] * 512), "-o", "export", d])
    assert "TYPE=swap" in swap
    assert p3["size"] * 512 == t.swap_mib * MiB
    # sparse: the 5 GB disk costs what the image holds plus the ephemeral ext3's journal
    assert d.stat().st_blocks * 512 < 160 * MiB


def test_node_disk_is_reused_until_the_image_changes(small_image, tmp_path):
    t = disk.instance_type("m1.small")
    d = disk.node_disk(small_image, tmp_path / "disk.raw", t)
    first = d.stat().st_mtime_ns
    assert disk.node_disk(small_image, tmp_path / "disk.raw", t).stat().st_mtime_ns == first
    sh.run(["tune2fs", "-L", "changed", small_image])
    d2 = disk.node_disk(small_image, tmp_path / "disk.raw", t)
    assert d2.stat().st_mtime_ns != first
    assert "LABEL=changed" in sh.output(["blkid", "-p", "-O", str(2048 * 512), "-o", "export", d2])
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.swap"))


def test_overlay_writes_never_reach_the_base_disk(small_image, tmp_path):
    base = disk.node_disk(small_image, tmp_path / "disk.raw", disk.instance_type("m1.small"))
    before = _sha(base, 0, 2 * MiB)
    ov = disk.overlay(base, tmp_path / "root.qcow2")
    sh.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", ov])
    assert _sha(base, 0, 2 * MiB) == before
    info = json.loads(sh.output(["qemu-img", "info", "--output=json", ov]))
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base.resolve())


def test_unknown_instance_type_names_the_known_ones():
    with pytest.raises(Exception, match="m1.small"):
        disk.instance_type("m9.huge")


def _get(data, path):
    return metadata.resolve(data, path)


def test_metadata_service_serves_what_cloud_tools_read():
    tree = metadata.metadata_tree(instance_id="i-12345678", local_ipv4="169.254.169.15", hostname="i-12345678",
                                  ssh_public_key="ssh-rsa AAAAB3 bake-verify")
    data = {"meta-data": tree, "user-data": None}
    assert "latest" in _get(data, "/").split()
    assert _get(data, "/latest/") == "meta-data/"
    listing = _get(data, "/latest/meta-data/").splitlines()
    for entry in ("instance-id", "local-ipv4", "public-keys/", "placement/", "ami-id", "hostname"):
        assert entry in listing
    assert _get(data, "/latest/meta-data/instance-id") == "i-12345678"
    assert _get(data, "/2009-04-04/meta-data/local-ipv4") == "169.254.169.15"
    assert _get(data, "/latest/meta-data/public-keys/") == "0=bake-verify"
    assert _get(data, "/latest/meta-data/public-keys/0/") == "openssh-key"
    assert _get(data, "/latest/meta-data/public-keys/0/openssh-key") == "ssh-rsa AAAAB3 bake-verify\n"
    assert _get(data, "/latest/meta-data/placement/availability-zone") == "local"
    assert _get(data, "/latest/user-data") is None
    assert _get(data, "/latest/meta-data/nothing-here") is None


def test_metadata_without_a_key_has_no_public_keys():
    tree = metadata.metadata_tree(instance_id="i-1", local_ipv4="x", hostname="h", ssh_public_key=None)
    data = {"meta-data": tree}
    assert "public-keys/" not in _get(data, "/latest/meta-data/").splitlines()
    assert _get(data, "/latest/meta-data/public-keys/0/openssh-key") is None


def test_metadata_service_answers_one_http_request_per_run_and_logs_it(tmp_path):
    f = tmp_path / "md.json"
    metadata.write_metadata(f, metadata.metadata_tree(instance_id="i-abc", local_ipv4="1.2.3.4", hostname="h",
                                                      ssh_public_key=None))
    out = io.BytesIO()
    metadata.serve_one(str(f), io.BytesIO(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"), out)
    assert out.getvalue().startswith(b"HTTP/1.0 200 OK\r\n") and out.getvalue().endswith(b"\r\n\r\ni-abc")
    # run as QEMU runs it: a fresh process whose stdin/stdout are the connection
    r = subprocess.run([__import__("sys").executable, "-I", metadata.__file__, str(f)],
                       input=b"GET /latest/meta-data/public-keys/0/openssh-key HTTP/1.0\r\n\r\n",
                       capture_output=True, timeout=30)
    assert r.stdout.startswith(b"HTTP/1.0 404") and r.stderr == b""
    assert [(x["path"], x["status"]) for x in metadata.request_log(f)] == [
        ("/latest/meta-data/instance-id", 200), ("/latest/meta-data/public-keys/0/openssh-key", 404)]


def test_console_wait_says_what_it_waited_for_and_shows_the_tail(tmp_path):
    with sh.background(["sh", "-c", "echo one; echo two; exit 3"], stdout=subprocess.PIPE) as p:
        c = Console(p.stdout, tmp_path / "console.log", p)
        assert c.wait_for("two", timeout=10, what="two").group(0) == "two"
        with pytest.raises(GuestTimeout, match=r"QEMU exited .* before the word three(?s:.*)one\ntwo"):
            c.wait_for("three", timeout=10, what="the word three")
        c.close()
    assert (tmp_path / "console.log").read_text() == "one\ntwo\n"


def test_console_lines_are_whole_when_reads_split_a_character_or_an_escape(tmp_path):
    # "é" (two bytes) and a colour escape each cut in half between two writes
    script = r"printf 'caf\303'; sleep 0.3; printf '\251 \033['; sleep 0.3; printf '1;32mok\033[0m\r\n'"
    with sh.background(["sh", "-c", script], stdout=subprocess.PIPE) as p:
        c = Console(p.stdout, tmp_path / "console.log", p)
        c.wait_for("ok", timeout=10, what="ok")
        c.close()
    assert c.lines() == ["café ok"]


def test_console_wait_stops_at_a_failure_line(tmp_path):
    with sh.background(["sh", "-c", "echo 'Kernel panic - not syncing: VFS'; exec sleep 60"],
                       stdout=subprocess.PIPE) as p:
        c = Console(p.stdout, tmp_path / "console.log", p)
        with pytest.raises(GuestTimeout, match="the guest failed before ready: Kernel panic"):
            c.wait_for("ready", timeout=30, what="ready", fail="Kernel panic")


def test_console_wait_with_quiet_waits_for_a_guest_that_keeps_printing_past_quiet(tmp_path):
    # 3 s of boot messages, one every 0.2 s, then the line: longer than `quiet` in all
    script = "i=0; while [ $i -lt 15 ]; do echo boot $i; sleep 0.2; i=$((i+1)); done; echo ready"
    with sh.background(["sh", "-c", script], stdout=subprocess.PIPE) as p:
        c = Console(p.stdout, tmp_path / "console.log", p)
        t0 = time.monotonic()
        c.wait_for("ready", timeout=60, quiet=1.5, what="ready")
        assert time.monotonic() - t0 > 1.5
        c.close()


def test_console_wait_with_quiet_gives_up_on_a_silent_guest_saying_so(tmp_path):
    with sh.background(["sh", "-c", "echo booting; exec sleep 60"], stdout=subprocess.PIPE) as p:
        c = Console(p.stdout, tmp_path / "console.log", p)
        c.wait_for("booting", timeout=10, what="booting")
        with pytest.raises(GuestTimeout, match=r"waiting for ready: the guest printed nothing for 1 s(?s:.*)booting"):
            c.wait_for("ready", timeout=60, quiet=1, what="ready")


def test_accelerator_override_skips_the_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("BAKE_ACCEL", "tcg")
    a = accel.choose(tmp_path / "no-kernel", tmp_path / "no-ramdisk")
    assert (a.name, a.reason) == ("tcg", "BAKE_ACCEL=tcg")
    assert a.qemu_args()[:2] == ["-accel", "tcg"]
