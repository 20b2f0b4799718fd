"""The sync-agent check: the whole story of keeping a root filesystem on a volume.

Instance A: a blank volume labelled for the agent is hot-plugged, the agent pairs with
it and makes a first full backup; A then gets marker changes (a new file, an edited
config file, a deleted file, a package installed with dpkg) and a backup completes. A is
killed (QMP quit: no shutdown, as a lost node). A fresh instance B boots from the same
trio, the volume is hot-plugged, the agent restores the last complete generation and
reboots; B must then have A's markers (and not the deleted file), and backups resume.

What the agent says on the console (`rootsync: backup complete ...`, `rootsync: restore
complete ...`) is the event the host waits for; `rootsync status --json` is evidence.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

from builder.core import sh
from ..vm import Instance, blank_volume
from ..vm.console import GuestTimeout
from ..vm.guest import GuestCommandError
from .checks import guest_ssh
from .result import CheckFailed, CheckResult

LABEL = "rootsync"
VOLUME_BYTES = 4 << 30
EX_BUSY = 4
BACKUP_DONE = re.compile(r"rootsync: backup (complete generation=(?P<gen>\S+)|failed)")
RESTORE_DONE = re.compile(r"rootsync: (restore complete generation=(?P<gen>\S+)|restore failed|error: .*)")
DELETE_CANDIDATES = ("/etc/issue.net", "/etc/issue", "/etc/debian_version")


def _marker_package(scratch: Path, nonce: str) -> Path:
    """A tiny .deb (gzip, readable by old dpkg) that installs /usr/share/bake-verify/<nonce>."""
    root = scratch / "marker-pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/bake-verify").mkdir(parents=True)
    (root / "usr/share/bake-verify" / nonce).write_text(nonce + "\n")
    (root / "DEBIAN/control").write_text(
        "Package: bake-verify-marker\n"
        f"Version: 1.0+{nonce}\n"
        "Architecture: all\n"
        "Maintainer: bake <bake@localhost>\n"
        "Description: marker installed on instance A of a verification\n")
    deb = scratch / f"bake-verify-marker_{nonce}.deb"
    sh.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", root, deb], what="building the marker package",
           quiet=True)
    return deb


def _root(inst: Instance) -> str:
    """The prefix that runs a guest command as root (the default user has passwordless sudo)."""
    return "" if guest_ssh(inst).user == "root" else "sudo "


def _status(inst: Instance) -> dict[str, Any]:
    out = guest_ssh(inst).run(f"{_root(inst)}rootsync status --json", timeout=60).output.strip().splitlines()
    for line in reversed(out):
        if line.startswith("{"):
            return json.loads(line)
    raise CheckFailed(f"`rootsync status --json` printed no JSON on instance {inst.name}: {out[-3:]}")


def _backup(inst: Instance, timeout: float) -> str:
    """Run a backup now and return its generation; when the agent's own backup is running
    (busy), wait for it to end on the console and ask again."""
    deadline = time.monotonic() + timeout
    while True:
        mark = inst.console.mark()
        r = guest_ssh(inst).run(f"{_root(inst)}rootsync backup", timeout=max(1, deadline - time.monotonic()),
                                check=False)
        m = re.search(r"backup complete generation=(\S+)", r.output)
        if r.returncode == 0 and m:
            return m.group(1)
        if r.returncode != EX_BUSY:
            raise CheckFailed(f"`rootsync backup` on instance {inst.name} exited {r.returncode}: "
                              f"{r.output.strip()[-300:]}")
        inst.console.wait_for(BACKUP_DONE, since=mark, timeout=max(1, deadline - time.monotonic()),
                              what=f"the agent's running backup on instance {inst.name} to end")


def _covering(st: dict[str, Any], since: float) -> dict[str, Any] | None:
    """The current generation, when it holds every change made before guest time `since`
    (its `covers_until` is later: an incremental generation covers the events cut before
    it started, not everything up to its start)."""
    current = next((g for g in st.get("generations") or () if g.get("current")), None)
    if current and current.get("restorable") and (current.get("covers_until") or 0) > since:
        return current
    return None


def _backup_covering(inst: Instance, since: float, timeout: float, what: str, *,
                     explicit: bool = True) -> tuple[str, str]:
    """Wait until the current generation covers guest time `since` (made by the agent's
    own, watch-triggered backups) and return (generation, kind). When no watcher runs,
    back up explicitly if `explicit`, else fail: the agent is not backing up by itself."""
    deadline = time.monotonic() + timeout
    while True:
        mark = inst.console.mark()  # before asking, so that a backup ending meanwhile is not missed
        st = _status(inst)
        gen = _covering(st, since)
        if gen is not None:
            return gen["name"], str(gen.get("kind"))
        if not (st.get("watcher") or {}).get("running"):
            if not explicit:
                raise CheckFailed(f"the agent's watcher is not running on instance {inst.name}, so nothing "
                                  f"backs up {what} by itself", status=st)
            return _backup(inst, max(1.0, deadline - time.monotonic())), "explicit"
        inst.console.wait_for(BACKUP_DONE, since=mark, timeout=max(1.0, deadline - time.monotonic()),
                              what=f"the agent on instance {inst.name} to back up {what}")


MARKERS = r"""
set -e
nonce=$1; gone=$2
echo "$nonce" > /etc/bake-verify-marker
[ -e /etc/motd ] || : > /etc/motd
echo "bake-verify edited $nonce" >> /etc/motd
rm -f "$gone"
dpkg -i /tmp/bake-verify-marker.deb >/dev/null
rm -f /tmp/bake-verify-marker.deb
sync
echo "markers-written $(date +%s.%N)"
"""

CHECK_MARKERS = r"""
nonce=$1; gone=$2
echo "new_file=$(cat /etc/bake-verify-marker 2>/dev/null || echo missing)"
grep -q "bake-verify edited $nonce" /etc/motd 2>/dev/null && echo edited_config=yes || echo edited_config=no
[ -e "$gone" ] && echo deleted_file=present || echo deleted_file=absent
echo "package=$(dpkg-query -W -f='${Version}:${Status}' bake-verify-marker 2>/dev/null | tr ' ' _)"
[ -e /usr/share/bake-verify/$nonce ] && echo package_file=yes || echo package_file=no
"""


def sync_agent(session, a: Instance, result: CheckResult, *, timeout: float) -> None:
    """Run the story above on instance `a` (booted) and a fresh instance b."""
    ev = result.evidence
    ssh = guest_ssh(a)
    found = ssh.run("PATH=$PATH:/usr/sbin:/sbin; command -v rootsync || true", timeout=30).output.strip()
    if not found:
        raise CheckFailed("the image has no sync agent: `rootsync` is not installed "
                          "(bake the image with the sync-agent element)")
    nonce = secrets.token_hex(4)
    scratch: Path = session.scratch
    volume = blank_volume(scratch / "rootsync-volume.raw", VOLUME_BYTES, label=LABEL)
    deb = _marker_package(scratch, nonce)
    t0 = time.monotonic()

    # --- instance a: pair, first backup, markers, backup, kill ------------------------
    mark = a.console.mark()
    a.attach_volume(volume, serial=f"rootsync{nonce}")
    # b boots from the trio while a's agent makes its first full backup (the longest
    # step), on the host's other core, unless the hygiene check booted it already; b gets
    # the volume only after a is dead
    b = session.second() if session.opts.overlap_instances or session.b is not None else None
    m = a.console.wait_for(BACKUP_DONE, since=mark, timeout=timeout,
                           what="the agent on instance a to finish its first backup to the hot-plugged volume")
    if not m["gen"]:
        raise CheckFailed(f"the agent's first backup on instance a failed: {m.string.strip()}")
    ev["a_first_backup"] = m.string.strip()
    ev["a_first_backup_seconds"] = round(time.monotonic() - t0, 1)

    gone = ssh.run("for f in " + " ".join(DELETE_CANDIDATES) + "; do [ -e $f ] && echo $f && break; done; true",
                   timeout=30).output.strip()
    if not gone:
        raise CheckFailed("found no file to delete on instance a (" + ", ".join(DELETE_CANDIDATES) + ")")
    ssh.run("cat > /tmp/bake-verify-marker.deb", input=deb.read_bytes(), timeout=60)
    out = ssh.run(f"{_root(a)}sh -c {shlex.quote(MARKERS)} markers {nonce} {shlex.quote(gone)}", timeout=120).output
    written = re.search(r"markers-written (\d+(?:\.\d+)?)", out)
    if not written:
        raise CheckFailed(f"writing the markers on instance a failed: {out.strip()[-300:]}")
    ev["markers"] = {"new_file": "/etc/bake-verify-marker", "edited_config": "/etc/motd", "deleted_file": gone,
                     "package": f"bake-verify-marker 1.0+{nonce}"}
    t_markers = time.monotonic()
    gen_a, kind = _backup_covering(a, float(written.group(1)), timeout, "the markers")
    ev["a_markers_backup"] = {"generation": gen_a, "kind": kind,
                              "seconds_after_markers": round(time.monotonic() - t_markers, 1)}
    status_a = _status(a)
    ev["a_status"] = {k: status_a.get(k) for k in ("current", "paired", "volume_id", "last_backup")}
    if (status_a.get("current") or "") < gen_a:
        raise CheckFailed(f"after backing up generation {gen_a}, the agent reports {status_a.get('current')} "
                          "as current")
    a.kill()
    ev["a_killed"] = "QMP quit"

    # --- instance b: fresh boot, attach, restore + reboot, markers, backups resume -------
    b = b or session.second()
    ready = b.wait_ready(timeout=session.opts.boot_timeout)
    ev["b_first_boot"] = ready.first_boot
    mark = b.console.mark()
    t1 = time.monotonic()
    b.attach_volume(volume, serial=f"rootsync{nonce}")
    m = b.console.wait_for(RESTORE_DONE, since=mark, timeout=timeout,
                           what="the agent on instance b to restore from the volume")
    if not m["gen"]:
        raise CheckFailed(f"the agent on instance b did not restore: {m.string.strip()}",
                          console_tail=b.console.tail(30))
    ev["b_restore"] = m.string.strip()
    b.ssh.drop_master()  # the guest reboots now: a fresh login afterwards
    # the agent may have made a later generation of its own before a was killed; older
    # than the backup taken after the markers would lose them
    ev["b_restored_generation"] = m["gen"]
    if m["gen"] < gen_a:
        raise CheckFailed(f"instance b restored generation {m['gen']}, older than a's backup {gen_a} of the markers")
    after_restore = b.console.mark()
    try:
        again = b.wait_ready(timeout=session.opts.boot_timeout, since=after_restore, since_time=time.monotonic())
    except GuestTimeout as e:
        raise CheckFailed(f"instance b did not come back after the restore: {str(e).splitlines()[0]}",
                          console_tail=e.tail) from None
    ev["b_restore_and_reboot_seconds"] = round(time.monotonic() - t1, 1)
    ev["b_ready_after_restore"] = again.line
    try:
        b.ssh.wait(timeout=60)
    except GuestCommandError as e:
        raise CheckFailed(f"cannot log in to instance b after the restore: {e}") from None
    out = b.ssh.run(f"sh -c {shlex.quote(CHECK_MARKERS)} check {nonce} {shlex.quote(gone)}", timeout=60).output
    seen = dict(line.split("=", 1) for line in out.strip().splitlines() if "=" in line)
    ev["b_markers"] = seen
    wrong = []
    if seen.get("new_file") != nonce:
        wrong.append(f"new file /etc/bake-verify-marker is {seen.get('new_file')!r}")
    if seen.get("edited_config") != "yes":
        wrong.append("the edit of /etc/motd is missing")
    if seen.get("deleted_file") != "absent":
        wrong.append(f"{gone}, deleted on a, is back")
    if not seen.get("package", "").startswith(f"1.0+{nonce}:install_ok_installed") or seen.get("package_file") != "yes":
        wrong.append(f"package bake-verify-marker is {seen.get('package')!r}")
    if wrong:
        raise CheckFailed("instance b does not have a's state: " + "; ".join(wrong))

    # backups resume on b
    changed = b.ssh.run(f"{_root(b)}sh -c 'date > /etc/bake-verify-after-restore; sync; date +%s.%N'",
                        timeout=30).output.strip().splitlines()[-1]
    # after a restore the agent must back up by itself again: no explicit backup here
    gen_b, kind = _backup_covering(b, float(changed), timeout, "a change made after the restore", explicit=False)
    status_b = _status(b)
    ev["b_backup"] = {"generation": gen_b, "kind": kind}
    ev["b_status"] = {k: status_b.get(k) for k in ("current", "paired", "volume_id", "watcher")}
    if gen_b <= gen_a or (status_b.get("current") or "") < gen_b:
        raise CheckFailed(f"backups did not resume on b (current {status_b.get('current')}, a's was {gen_a})")
    result.summary = (f"a backed up {gen_a}, was killed; b restored it and rebooted "
                      f"({ev['b_restore_and_reboot_seconds']:.0f} s), has a's markers, not {gone}; "
                      f"b backed up {gen_b}")
