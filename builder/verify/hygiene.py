"""The hygiene check: two instances of one image are two machines, and neither carries
anything of the build host.

Instance a (already up) and a second fresh instance b of the same trio each report their
SSH host keys and machine id: both must have their own, none shared. On a, the files
that would hold the build host's identity or network (its hostname, /etc/hosts,
/etc/resolv.conf, apt's sources and configuration, /etc/environment) must not name the
build host's hostname, nameservers, search domains, proxies, or an archive the build
fetched from that is not the image's own (`image_mirror` in build.json).

The build host's facts are read where the check runs (a verification on the build box,
as `bake` runs it) and from the build's record (the archive it fetched from).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.core import sh
from builder.core.record import Build
from ..vm import Instance
from .checks import guest_ssh
from .result import CheckFailed, CheckResult

# Sections of what a guest reports, in this order; each command's errors are dropped
# (a file an image does not have is simply not there).
REPORT = "; ".join(f"echo '=== {name}'; {cmd} 2>/dev/null || true" for name, cmd in (
    ("hostname", "hostname"),
    ("etc-hostname", "cat /etc/hostname"),
    ("hosts", "cat /etc/hosts"),
    ("resolv", "cat /etc/resolv.conf"),
    ("apt", "cat /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/apt/apt.conf /etc/apt/apt.conf.d/*"),
    ("environment", "cat /etc/environment"),
    ("machine-id", "cat /etc/machine-id"),
    ("host-keys", "cat /etc/ssh/ssh_host_*_key.pub"),
))
SECTION = re.compile(r"^=== (\S+)$")
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY")
APT_PROXY = re.compile(r'^Acquire::\w+::Proxy(?:::\S+)? "(?P<url>[^"]+)";', re.M)
# QEMU's user network: the nameserver and domain an instance is given there, whatever the host's
QEMU_USER_NET = ipaddress.ip_network("10.0.2.0/24")


@dataclass
class BuildHost:
    """What an image must not name of the build host that made it."""

    hostname: str
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    proxies: list[str] = field(default_factory=list)
    mirrors: list[str] = field(default_factory=list)    # archives the build fetched from, not the image's own

    @classmethod
    def of(cls, build: Build, *, resolv: Path = Path("/etc/resolv.conf"),
           environ: dict[str, str] | None = None) -> "BuildHost":
        environ = dict(os.environ) if environ is None else environ
        host = cls(hostname=socket.gethostname().split(".")[0])
        text = resolv.read_text(errors="replace") if resolv.is_file() else ""
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver" and distinctive_address(words[1]):
                host.nameservers.append(words[1])
            elif words and words[0] in ("search", "domain"):
                host.search += [w.rstrip(".") for w in words[1:] if w.rstrip(".")]
        proxies = [environ[v] for v in PROXY_VARS if environ.get(v)]
        proxies += APT_PROXY.findall(apt_config())
        host.proxies = sorted({p.rstrip("/") for p in proxies if p.lower() not in ("direct", "false", "")})
        built_from, ships = build.data.get("mirror"), build.data.get("image_mirror")
        if built_from and ships and built_from.rstrip("/") != ships.rstrip("/"):
            host.mirrors.append(built_from.rstrip("/"))
        return host


def distinctive_address(addr: str) -> bool:
    """Whether nameserver `addr` tells this host apart: not a loopback stub (every
    resolver has one) nor QEMU's user-network resolver (every local instance has it)."""
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    return not ip.is_loopback and ip not in QEMU_USER_NET


def apt_config() -> str:
    """The build host's apt configuration as `apt-config dump` prints it ('' without apt)."""
    if shutil.which("apt-config") is None:
        return ""
    r = sh.run(["apt-config", "dump"], check=False, quiet=True, timeout=30, what="apt-config dump")
    return r.output if r.returncode == 0 else ""


def guest_report(inst: Instance) -> dict[str, str]:
    """The REPORT sections of what instance `inst` says of itself."""
    out = guest_ssh(inst).run(REPORT, timeout=60).output
    sections: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = SECTION.match(line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def host_keys(report: dict[str, str]) -> dict[str, str]:
    """key blob -> key type, of the host keys an instance reported."""
    keys = {}
    for line in report.get("host-keys", "").splitlines():
        words = line.split()
        if len(words) >= 2:
            keys[words[1]] = words[0]
    return keys


def leftovers(report: dict[str, str], host: BuildHost) -> list[str]:
    """What instance a's report names of the build host, each said as one finding."""
    found = []
    name = host.hostname
    if name and name != "localhost":
        if report.get("hostname", "").strip().split(".")[0] == name:
            found.append(f"its hostname is the build host's ({name})")
        if report.get("etc-hostname", "").strip().split(".")[0] == name:
            found.append(f"/etc/hostname names the build host ({name})")
        if any(name in line.split()[1:] for line in report.get("hosts", "").splitlines()
               if not line.lstrip().startswith("#")):
            found.append(f"/etc/hosts names the build host ({name})")
    resolv = [line.split() for line in report.get("resolv", "").splitlines()]
    servers = {w[1] for w in resolv if len(w) >= 2 and w[0] == "nameserver"}
    domains = {d.rstrip(".") for w in resolv if w and w[0] in ("search", "domain") for d in w[1:]}
    found += [f"/etc/resolv.conf names the build host's nameserver {s}" for s in host.nameservers if s in servers]
    found += [f"/etc/resolv.conf names the build host's search domain {d}" for d in host.search if d in domains]
    for where, text in (("apt's configuration", report.get("apt", "")),
                        ("/etc/environment", report.get("environment", ""))):
        found += [f"{where} names the build host's proxy {p}" for p in host.proxies if p in text]
    found += [f"apt's sources name {m}, the archive the build fetched from (not the image's own)"
              for m in host.mirrors if m in report.get("apt", "")]
    return found


def hygiene(a: Instance, second: Any, result: CheckResult, *, host: BuildHost, timeout: float) -> None:
    """Fill `result` for a and a second instance started by `second()`; CheckFailed on a
    shared or missing host key or machine id, or on anything of `host` found on a."""
    ev = result.evidence
    ev["build_host"] = asdict(host)
    report_a = guest_report(a)
    b = second()
    ready = b.wait_ready(timeout=timeout)
    ev["b_first_boot"] = ready.first_boot
    guest_ssh(b).wait(timeout=60)
    report_b = guest_report(b)
    keys_a, keys_b = host_keys(report_a), host_keys(report_b)
    ids = {n: r.get("machine-id", "").strip() for n, r in (("a", report_a), ("b", report_b))}
    ev["machine_ids"] = ids
    ev["host_key_types"] = {"a": sorted(keys_a.values()), "b": sorted(keys_b.values())}
    problems = []
    if not ready.first_boot:
        problems.append("instance b says this is not its first boot")
    for n, keys in (("a", keys_a), ("b", keys_b)):
        if not keys:
            problems.append(f"instance {n} has no SSH host key")
    shared = sorted(keys_a[k] for k in keys_a.keys() & keys_b.keys())
    if shared:
        problems.append(f"both instances have the same {', '.join(shared)} host key: it was shipped in the image")
    for n, mid in ids.items():
        if not re.fullmatch(r"[0-9a-f]{32}", mid):
            problems.append(f"instance {n} has no machine id (/etc/machine-id holds {mid[:40]!r})")
    if ids["a"] and ids["a"] == ids["b"]:
        problems.append(f"both instances have machine id {ids['a']}: it was shipped in the image")
    found = leftovers(report_a, host)
    ev["build_host_found"] = found
    problems += [f"instance a: {f}" for f in found]
    if problems:
        raise CheckFailed("; ".join(problems), **ev)
    said = [f"hostname {host.hostname}"] + [f"{len(v)} {k}" for k, v in (
        ("nameserver(s)", host.nameservers), ("search domain(s)", host.search), ("proxy(ies)", host.proxies),
        ("build-only archive(s)", host.mirrors)) if v]
    result.summary = (f"a and b have their own host keys ({', '.join(sorted(set(keys_a.values())))}) and machine "
                      f"ids; nothing of the build host on a ({', '.join(said)})")
