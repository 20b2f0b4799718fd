"""User data for images that run cloud-init, and the `user-data` check.

The metadata service is exercised over real TCP connections, each answered by a fresh
run of the service script whose stdin, stdout and stderr are the connection, as QEMU's
guestfwd runs it; the requests are the ones cloud-init 22.4's Ec2 datasource makes
(Debian bookworm's): the IMDSv2 token PUT (which must fail at once, cleanly, so that it
falls back to IMDSv1), instance-id under each API version it knows, then the crawl of
2009-04-04's meta-data and user-data. Which checks a verification lists and whether it
serves user data follow the build's package list. The end-to-end tests boot the demo
build (no cloud-init) and a copy of the session's cloud-init build (tests/dib_builds.py),
whose own verification is checked in tests/test_dib_e2e.py, as is a root grown into the
free space after partition 1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from builder.core import sh
from builder.core.record import Build
from builder.verify import FAIL, SKIP, render_table, verify
from builder.verify.checks import USER_DATA_MARKER, user_data_script
from builder.verify.local import LocalOptions, check_names
from builder.vm import metadata

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBakeVerifyKeyForTheTests bake-verify"
SCRIPT = user_data_script("0123456789abcdef")
# cloud-init 22.4, sources/DataSourceEc2.py
EXTENDED_VERSIONS = ("2021-03-23", "2018-09-24", "2016-09-02")
MIN_VERSION = "2009-04-04"
TOKEN_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


class GuestFwd:
    """The service as QEMU's `guestfwd=...-cmd:` runs it: one process per connection,
    the connection as its stdin, stdout and stderr."""

    def __init__(self, datafile: Path):
        self.datafile = datafile
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.procs: list[subprocess.Popen] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self.procs.append(subprocess.Popen([sys.executable, "-I", metadata.__file__, str(self.datafile)],
                                                   stdin=conn, stdout=conn, stderr=conn))

    def close(self) -> None:
        self.server.close()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError("a run of the metadata service did not end after answering") from None


@pytest.fixture
def service(tmp_path):
    def start(user_data: str | None = SCRIPT, key: str | None = KEY) -> GuestFwd:
        f = tmp_path / "metadata.json"
        metadata.write_metadata(f, metadata.metadata_tree(instance_id="i-0badcafe", local_ipv4="169.254.169.15",
                                                          hostname="i-0badcafe", ssh_public_key=key), user_data)
        started.append(GuestFwd(f))
        return started[-1]
    started: list[GuestFwd] = []
    yield start
    for s in started:
        s.close()


def raw_exchange(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` without closing our side, and read until the service closes the
    connection (a socket timeout means it did not)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# --- IMDSv2 token request ---------------------------------------------------------------

def test_the_imdsv2_token_put_gets_a_404_and_the_connection_closes(service):
    svc = service()
    r = requests.put(f"{svc.url}/latest/api/token", headers={TOKEN_HEADER: "21600"}, timeout=10)
    assert r.status_code == 404  # >= 400: cloud-init stops asking for a token and uses IMDSv1
    assert r.headers["Connection"] == "close"
    svc.close()
    assert [p.returncode for p in svc.procs] == [0]
    assert [(q["method"], q["path"], q["status"]) for q in metadata.request_log(svc.datafile)] == [
        ("PUT", "/latest/api/token", 404)]


@pytest.mark.parametrize("request_bytes", [
    # as cloud-init's requests sends it: HTTP/1.1, keep-alive, Content-Length: 0
    b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: keep-alive\r\n"
    b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\r\n",
    # no Content-Length at all: no body, nothing more to wait for
    b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
    # a body, which is read before the answer
    b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Length: 11\r\n\r\nhello world",
], ids=["content-length-0", "no-content-length", "with-a-body"])
def test_a_put_is_answered_and_closed_without_waiting_for_more(service, request_bytes):
    svc = service()
    out = raw_exchange(svc.url, request_bytes)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 404 Not Found\r\n") and b"Connection: close" in head
    assert body == b"Not Found"
    svc.close()
    assert [p.returncode for p in svc.procs] == [0]


# --- what the Ec2 datasource reads ------------------------------------------------------

def materialize(get, url: str) -> dict:
    """cloud-init's MetadataMaterializer (ec2_utils.py): a listing's `name/` lines are
    children fetched as `url/name/`, `i=name` lines are keys at `url/i/openssh-key`,
    other lines leaves; any failed fetch fails the whole crawl."""
    tree: dict = {}
    for line in get(url).splitlines():
        line = line.strip()
        name = line.rstrip("/")
        if not name:
            continue
        if line.endswith("/"):
            tree[name] = materialize(get, f"{url.rstrip('/')}/{name}/")
            continue
        resource = name
        ident, eq, key_name = line.partition("=")
        if eq and ident.isdigit():
            resource, name = f"{ident}/openssh-key", key_name
        tree[name] = get(f"{url.rstrip('/')}/{resource}")
    return tree


def test_cloud_init_s_ec2_crawl_finds_the_2009_04_04_api_the_key_and_the_user_data(service):
    svc = service()
    session_paths = []

    def get(url: str) -> str:
        r = requests.get(url, timeout=10)
        session_paths.append(url.removeprefix(svc.url))
        r.raise_for_status()
        return r.text

    # IMDSv2 first, then instance-id under the oldest version to find the service
    assert requests.put(f"{svc.url}/latest/api/token", headers={TOKEN_HEADER: "21600"}, timeout=10).status_code >= 400
    assert get(f"{svc.url}/{MIN_VERSION}/meta-data/instance-id") == "i-0badcafe"
    # the newest version the service has: the extended ones are 404, so 2009-04-04
    for ver in EXTENDED_VERSIONS:
        assert requests.get(f"{svc.url}/{ver}/meta-data/instance-id", timeout=10).status_code == 404
    assert get(f"{svc.url}/{MIN_VERSION}/user-data") == SCRIPT
    md = materialize(get, f"{svc.url}/{MIN_VERSION}/meta-data/")
    assert md["instance-id"] == "i-0badcafe" and md["local-ipv4"] == "169.254.169.15"
    assert md["public-keys"] == {"bake-verify": KEY + "\n"}
    assert md["placement"] == {"availability-zone": "local"}
    assert md["block-device-mapping"] == {"ami": "/dev/vda1", "root": "/dev/vda1", "ephemeral0": "/dev/vda2",
                                          "swap": "/dev/vda3"}
    # the trailing-slash listings the crawl asked for
    assert {f"/{MIN_VERSION}/meta-data/placement/", f"/{MIN_VERSION}/meta-data/public-keys/",
            f"/{MIN_VERSION}/meta-data/block-device-mapping/",
            f"/{MIN_VERSION}/meta-data/public-keys/0/openssh-key"} <= set(session_paths)
    svc.close()
    assert all(p.returncode == 0 for p in svc.procs) and len(svc.procs) == len(metadata.request_log(svc.datafile))


def test_listings_answer_with_and_without_the_trailing_slash(service):
    svc = service()
    for path, body in [("/latest/meta-data/placement/", "availability-zone"),
                       ("/latest/meta-data/placement", "availability-zone"),
                       ("/2009-04-04/meta-data/public-keys/", "0=bake-verify"),
                       ("/2009-04-04/meta-data/public-keys/0/", "openssh-key"),
                       ("/2009-04-04/meta-data/public-keys/0", "openssh-key"),
                       ("/2009-04-04/", "meta-data/\nuser-data"),
                       ("/2009-04-04/user-data", SCRIPT)]:
        r = requests.get(svc.url + path, timeout=10)
        assert (r.status_code, r.text) == (200, body), path


def test_without_user_data_user_data_is_a_404_as_before(service):
    svc = service(user_data=None)
    assert requests.get(f"{svc.url}/2009-04-04/user-data", timeout=10).status_code == 404
    assert requests.get(f"{svc.url}/latest/", timeout=10).text == "meta-data/"


def test_the_served_script_writes_its_token_to_the_marker_and_nothing_else(tmp_path):
    token = "feedface" * 4
    marker = tmp_path / "var/lib/bake-verify/user-data"
    script = user_data_script(token, str(marker))
    assert script.startswith("#!/bin/sh\n")
    sh.run(["sh", "-c", script])
    assert marker.read_text() == token + "\n"
    assert sorted(p.name for p in marker.parent.iterdir()) == ["user-data"]
    assert user_data_script(token).endswith(f" {USER_DATA_MARKER}\n")  # the file the check reads


# --- which checks run, and when user data is served -------------------------------------

def _build(tmp_path: Path, packages: list[str] | None) -> Build:
    b = Build.create(tmp_path, "r")
    if packages is not None:
        b.data["packages"] = [{"name": n, "version": "1", "arch": "all", "source": n} for n in packages]
    return b


def test_an_image_with_cloud_init_gets_the_user_data_check_after_metadata(tmp_path):
    o = LocalOptions.from_recipe({}, user="debian", build=_build(tmp_path, ["openssh-server", "cloud-init"]))
    assert o.cloud_init_in_image is True and o.serves_user_data()
    assert check_names(o) == ["boots", "metadata", "user-data", "acpiphp", "volume-hotplug", "hygiene", "sync-agent"]


def test_an_image_without_cloud_init_has_no_user_data_check_and_is_served_none(tmp_path):
    o = LocalOptions.from_recipe({}, user="debian", build=_build(tmp_path, ["openssh-server"]))
    assert o.cloud_init_in_image is False and not o.serves_user_data()
    assert "user-data" not in check_names(o)
    # asked for by name it is listed (and fails: nothing in the image runs user data)
    asked = LocalOptions.from_recipe({}, user="debian", build=_build(tmp_path / "2", ["openssh-server"]),
                                     only={"user-data"})
    assert check_names(asked) == ["user-data"] and not asked.serves_user_data()


def test_verify_skip_user_data_neither_lists_the_check_nor_serves_user_data(tmp_path):
    o = LocalOptions.from_recipe({"skip": ["user-data"]}, user="debian", build=_build(tmp_path, ["cloud-init"]))
    assert "user-data" not in check_names(o) and not o.serves_user_data()


def test_a_build_without_a_package_list_runs_the_check_only_when_asked(tmp_path):
    o = LocalOptions.from_recipe({}, user="debian", build=_build(tmp_path, None))
    assert o.cloud_init_in_image is None and "user-data" not in check_names(o) and not o.serves_user_data()
    asked = LocalOptions.from_recipe({}, user="debian", build=_build(tmp_path / "2", None), only={"user-data"})
    assert check_names(asked) == ["user-data"] and asked.serves_user_data()


def test_the_cloud_init_wait_follows_verify_timeout(tmp_path):
    o = LocalOptions.from_recipe({"timeout": 480}, user="debian", build=_build(tmp_path, ["cloud-init"]))
    assert o.cloud_init_timeout == 480.0


# --- end to end: the demo build, and a copy of it with cloud-init -----------------------

@pytest.fixture
def demo(request, tmp_path):
    from vm_builds import copy_build, kill_qemu_under, leftovers, qemu_processes_under, source_build

    b = copy_build(source_build(request), tmp_path)
    yield b
    left = qemu_processes_under(tmp_path)
    kill_qemu_under(tmp_path)
    assert not left, "a QEMU process outlived the verification"
    assert not leftovers(tmp_path), "temporary files outlived the verification"


def _say(request, text: str) -> None:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[{request.node.name}] {text}", flush=True)


@pytest.mark.bakes
@pytest.mark.boots
@pytest.mark.e2e
def test_asking_for_user_data_on_an_image_without_cloud_init_fails_saying_so(request, demo):
    from vm_builds import default_user

    assert not any(p["name"] == "cloud-init" for p in demo.data["packages"])
    report = verify(demo, user=default_user(demo), only={"user-data"})
    _say(request, "\n" + render_table(report))
    assert [r.name for r in report.results] == ["user-data"]
    ud = report.results[0]
    assert ud.status == FAIL and "has no cloud-init" in ud.summary
    served = json.loads((demo.dir / "verify/a/metadata.json").read_text())
    assert served["user-data"] is None


@pytest.fixture(scope="module")
def cloud_init_build(dib_build):
    """The session's bake of tests/recipes/dib-bookworm.yml: cloud-init (DIB's element)
    with the Ec2 datasource; its own verification ran the user-data check and passed
    (tests/test_dib_e2e.py)."""
    return dib_build["build"]


@pytest.fixture
def with_cloud_init(cloud_init_build, tmp_path):
    from vm_builds import copy_build, kill_qemu_under, leftovers, qemu_processes_under

    b = copy_build(cloud_init_build, tmp_path)
    yield b
    left = qemu_processes_under(tmp_path)
    kill_qemu_under(tmp_path)
    assert not left, "a QEMU process outlived the verification"
    assert not leftovers(tmp_path), "temporary files outlived the verification"


@pytest.mark.bakes
@pytest.mark.boots
@pytest.mark.e2e
def test_a_refused_login_on_a_cloud_init_image_shows_what_cloud_init_said(request, with_cloud_init):
    b = with_cloud_init
    report = verify(b, user="nobody-here", only={"metadata", "user-data"})
    _say(request, "\n" + render_table(report))
    md, ud = report.results
    assert md.status == FAIL and "cannot log in as nobody-here" in md.summary
    assert "cloud-init's console lines are in the evidence" in md.summary
    assert any("cloud-init" in l or "ci-info" in l for l in md.evidence["cloud_init_said"])
    assert ud.name == "user-data" and ud.status == SKIP and "no SSH channel" in ud.summary
