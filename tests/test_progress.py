"""Progress: live bars on a terminal (driven here through a real pseudo-terminal) and plain
lines elsewhere. The package counts of a real debootstrap and apt run are checked in
test_many_bakes, whose bakes start from an empty cache."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest

from bundle_keys import make_credentials
from conftest import BAKE

pytestmark = pytest.mark.slow

SIZE = 96 << 20


@pytest.fixture(scope="module")
def bundling(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    creds = make_credentials(d)
    image = d / "random.img"
    with open(image, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))     # incompressible: bundling takes a few seconds
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EC2_", "EUCA"))}
    env.update(EC2_CERT=str(creds.user.cert), EC2_PRIVATE_KEY=str(creds.user.key),
               EUCALYPTUS_CERT=str(creds.cloud.cert), EC2_USER_ID="123456789012")
    return image, env


def run_in_terminal(argv: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr; return its exit
    status and everything it wrote."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError(f"no output for {timeout} s: {bytes(out[-500:])!r}")
            try:
                chunk = os.read(master, 65536)
            except OSError:         # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            out += chunk
        p.wait(timeout=60)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out.decode(errors="replace")


def test_a_terminal_sees_live_progress_bars_with_a_byte_count_and_rate(bundling, tmp_path):
    image, env = bundling
    status, text = run_in_terminal([BAKE, "bundle", "-i", str(image), "-d", str(tmp_path / "b")],
                                   dict(env, TERM="xterm-256color", COLUMNS="120"))
    assert status == 0, text
    assert "\x1b[2K" in text, "the bar is redrawn in place"
    assert "bundling random.img" in text
    assert "/96.0 MiB" in text and "MiB/s" in text, text[-2000:]
    assert "bundling random.img: 96.0/96.0 MiB" in text, "the finished step leaves one line"
    assert str(tmp_path / "b" / "random.img.manifest.xml") in text


def test_without_a_terminal_the_output_is_plain_lines(bundling, tmp_path):
    image, env = bundling
    r = subprocess.run([BAKE, "bundle", "-i", str(image), "-d", str(tmp_path / "b")], capture_output=True,
                       text=True, env=dict(env, TERM="xterm-256color"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "MiB" not in r.stderr
    assert r.stderr.splitlines()[0].startswith("» Bundling random.img")


def test_a_dumb_terminal_gets_plain_lines(bundling, tmp_path):
    image, env = bundling
    status, text = run_in_terminal([BAKE, "bundle", "-i", str(image), "-d", str(tmp_path / "b")],
                                   dict(env, TERM="dumb"))
    assert status == 0, text
    assert "\x1b" not in text and "MiB" not in text
