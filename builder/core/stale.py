"""What a killed bake left, the next one undoes (see `lifetime` for the journal).

`clean_stale()` runs before every bake and in `bake doctor`: every journal whose lock no
process holds belongs to a dead session; what it lists as live is ended, unmounted,
detached, removed or marked failed, and said. This sits above `sh` (it unmounts and
detaches through it), while `lifetime`, which `sh` journals into, sits below.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.core import removal, sh, watchdog
from builder.core.lifetime import current_token, sessions_dir

log = logging.getLogger("bake.lifetime")


@dataclass
class Stale:
    """What one dead session had left, and what was done about it."""

    token: str
    header: dict
    found: list[str] = field(default_factory=list)      # what was undone, said for a person
    failed: list[str] = field(default_factory=list)     # what could not be undone

    def describe(self) -> str:
        h = self.header
        who = f"bake pid {h.get('pid', '?')} (`{h.get('command', '?')}`, started {h.get('started', '?')})"
        return who


def _loops_of(backing: str) -> list[str]:
    """Loop devices attached to the file `backing` (also once it was deleted)."""
    found = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if f.read_text().strip().removesuffix(" (deleted)") == backing:
                found.append(f"/dev/{f.parent.parent.name}")
    return found


def _undo(kind: str, value: str, rec: dict, stale: Stale) -> None:
    if kind in ("chroot", "mount"):
        # what the dead bake mounted on, or made a chroot of, as its journal says, and
        # what mountinfo shows there now (a chroot's binds, what its processes mounted)
        targets = sh.mounts_under(value)
        if targets:
            left = sh.unmount_all_under(value)
            if left:
                stale.failed.append(f"still mounted: {', '.join(left)}")
            stale.found.append(f"unmounted {', '.join(t for t in targets if t not in left)}")
    elif kind == "loop":        # value: the file a loop device was attached to
        for dev in _loops_of(value):
            r = sh.run(["losetup", "-d", dev], check=False, quiet=True)
            if r.returncode == 0:
                stale.found.append(f"detached loop device {dev} ({value})")
            else:
                stale.failed.append(f"loop device {dev} ({value}): {r.output.strip()}")
    elif kind == "path":
        p = Path(value)
        if p.exists() or p.is_symlink():
            # a mount still there (one the journal does not list as the dead bake's)
            # stops the removal: removal.MountBoundaryError, said in what failed
            removal.remove_tree(p, ignore_errors=True)
            if p.exists():
                stale.failed.append(f"could not remove {p}")
            else:
                stale.found.append(f"removed {rec.get('what', 'temporary')} {p}")
    elif kind == "build":
        for tmp in Path(value).glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            stale.found.append(f"removed half-written {tmp}")
        rec_path = Path(value) / "build.json"
        try:
            data = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            return
        if data.get("result") in ("running", None):
            data["result"] = "failed"
            data["error"] = (f"ended without finishing: its bake (pid {stale.header.get('pid', '?')}) was killed; "
                             f"cleaned up by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            tmp = rec_path.with_name(rec_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, rec_path)
            stale.found.append(f"marked build {value} failed (it never finished)")


# Mounts and chroots first (deepest first), then loop devices, then paths, then records.
_ORDER = {"pgid": 0, "chroot": 1, "mount": 1, "loop": 2, "path": 3, "build": 4}


def clean_stale() -> list[Stale]:
    """Undo what every dead session left (see the module's docstring); returns what
    was found, one `Stale` per dead session that had left anything."""
    d = sessions_dir()
    if not d.is_dir():
        return []
    current = current_token()
    done: list[Stale] = []
    for lock_path in sorted(d.glob("*.lock")):
        token = lock_path.stem
        if token == current:
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                              # its bake is alive
            journal = d / f"{token}.jsonl"
            if not lock_path.exists():
                continue                              # another cleaner was first
            stale = _clean_session(token, journal)
            journal.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            if stale.found or stale.failed:
                done.append(stale)
        finally:
            os.close(fd)
    # a journal whose lock file is gone (a cleaner killed half-way) has nothing to lock on
    for journal in d.glob("*.jsonl"):
        if not (d / f"{journal.stem}.lock").exists():
            stale = _clean_session(journal.stem, journal)
            journal.unlink(missing_ok=True)
            if stale.found or stale.failed:
                done.append(stale)
    return done


def _clean_session(token: str, journal: Path) -> Stale:
    header, live = watchdog.read_journal(str(journal))
    stale = Stale(token, header)
    same_boot = header.get("boot_id") == watchdog.boot_id()
    if header.get("watchdog_killed"):
        stale.found.append(f"its watchdog had ended {len(header['watchdog_killed'])} process(es) when it died")
    killed = watchdog.end_processes(token, str(journal), same_boot=same_boot)
    if killed:
        stale.found.append(f"ended {len(killed)} process(es) left running: {', '.join(map(str, killed))}")
    entries = sorted(live.items(), key=lambda kv: (_ORDER.get(kv[0][0], 9), -kv[0][1].count("/")))
    for (kind, value), rec in entries:
        try:
            _undo(kind, value, rec, stale)
        except Exception as e:  # one thing that cannot be undone must not stop the others
            stale.failed.append(f"{kind} {value}: {type(e).__name__}: {e}")
    return stale


def report_stale(found: list[Stale]) -> None:
    """Log, for a person, what `clean_stale` did."""
    for s in found:
        log.warning("cleaning what %s left when it was killed:", s.describe())
        for line in s.found:
            log.warning("  %s", line)
        for line in s.failed:
            log.error("  could not undo: %s", line)
