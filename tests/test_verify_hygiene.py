"""The hygiene check's judgement: what of the build host it looks for, and what it finds
in what an instance reports of itself (the two-instance half runs in test_verify.py,
on the demo build)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from builder.verify.hygiene import REPORT, BuildHost, distinctive_address, host_keys, leftovers

CLEAN = {
    "hostname": "debian-demo", "etc-hostname": "debian-demo",
    "hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tdebian-demo\n::1 localhost ip6-localhost ip6-loopback",
    "resolv": "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .",
    "apt": "deb http://archive.example/debian bookworm main\n",
    "environment": "", "machine-id": "0123456789abcdef0123456789abcdef",
    "host-keys": "ssh-ed25519 AAAAkeyone root@debian-demo\necdsa-sha2-nistp256 AAAAkeytwo root@debian-demo",
}


def build_host(tmp_path, resolv: str, environ: dict[str, str], *, mirror: str, image_mirror: str) -> BuildHost:
    (tmp_path / "resolv.conf").write_text(resolv)
    record = SimpleNamespace(data={"mirror": mirror, "image_mirror": image_mirror})
    return BuildHost.of(record, resolv=tmp_path / "resolv.conf", environ=environ)  # type: ignore[arg-type]


def test_the_build_hosts_distinctive_facts_are_collected(tmp_path):
    host = build_host(tmp_path, "# generated\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n"
                                "nameserver 10.0.2.3\nsearch corp.example lab.example.\ndomain corp.example\n",
                      {"http_proxy": "http://proxy.corp.example:3128/", "HTTPS_PROXY": "DIRECT", "PATH": "/bin"},
                      mirror="http://apt-cache.corp.example:3142/debian", image_mirror="http://archive.example/debian")
    assert host.hostname == socket.gethostname().split(".")[0]
    assert host.nameservers == ["10.255.255.53"]            # not the loopback stub, not QEMU's resolver
    assert host.search == ["corp.example", "lab.example", "corp.example"]
    assert "http://proxy.corp.example:3128" in host.proxies and "DIRECT" not in host.proxies
    assert host.mirrors == ["http://apt-cache.corp.example:3142/debian"]
    same = build_host(tmp_path, "", {}, mirror="http://archive.example/debian/",
                      image_mirror="http://archive.example/debian")
    assert same.mirrors == [] and same.nameservers == [] and same.search == []


def test_nothing_is_found_on_a_clean_instance_and_each_leftover_is_named():
    host = BuildHost("buildbox", ["10.255.255.53"], ["corp.example"], ["http://proxy.corp.example:3128"],
                     ["http://apt-cache.corp.example:3142/debian"])
    assert leftovers(CLEAN, host) == []
    dirty = dict(CLEAN, hostname="buildbox", hosts=CLEAN["hosts"] + "\n127.0.1.1 buildbox.corp.example buildbox",
                 resolv="nameserver 10.255.255.53\nsearch corp.example",
                 apt="deb http://apt-cache.corp.example:3142/debian bookworm main\n"
                     'Acquire::http::Proxy "http://proxy.corp.example:3128";',
                 environment="http_proxy=http://proxy.corp.example:3128")
    assert leftovers(dirty, host) == [
        "its hostname is the build host's (buildbox)",
        "/etc/hosts names the build host (buildbox)",
        "/etc/resolv.conf names the build host's nameserver 10.255.255.53",
        "/etc/resolv.conf names the build host's search domain corp.example",
        "apt's configuration names the build host's proxy http://proxy.corp.example:3128",
        "/etc/environment names the build host's proxy http://proxy.corp.example:3128",
        "apt's sources name http://apt-cache.corp.example:3142/debian, the archive the build fetched from "
        "(not the image's own)",
    ]


def test_host_keys_are_told_apart_by_their_blobs_and_addresses_by_kind():
    assert host_keys(CLEAN) == {"AAAAkeyone": "ssh-ed25519", "AAAAkeytwo": "ecdsa-sha2-nistp256"}
    assert host_keys({"host-keys": ""}) == {}
    assert [distinctive_address(a) for a in ("10.255.255.53", "127.0.0.53", "::1", "10.0.2.3", "fe80::1%eth0",
                                             "not-an-address")] == [True, False, False, False, True, False]
    # every section the check reads is asked of the guest, each command allowed to fail
    for section in CLEAN:
        assert f"echo '=== {section}';" in REPORT
    assert REPORT.count("|| true") == len(CLEAN)
