"""The watchdog: ends every process a bake started as soon as that bake is gone.

A bake starts one watchdog (`lifetime.Session`) and keeps the write end of a pipe whose
read end is the watchdog's standard input. However the bake ends, SIGKILL included, the
kernel closes that pipe; the watchdog then kills, with SIGKILL and until none is left:

- every process whose environment carries the bake's cookie (`BAKE_SESSION=<token>`),
  which every child inherits, and so its grandchildren, daemons that left their session
  and QEMU's helpers with it;
- every process group the bake's journal still lists (a child that cleared its
  environment);
- every process whose root directory lies in a chroot the journal still lists.

Only processes: mounts, loop devices and files are the next bake's to undo, from the
same journal (`stale.clean_stale`), which says what it cleans.

This file runs as a script with the standard library alone (`python3 -I watchdog.py
TOKEN JOURNAL`): it must start fast and must not depend on the bake it outlives.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

COOKIE = "BAKE_SESSION"


def read_journal(path: str) -> tuple[dict, dict[tuple[str, str], dict]]:
    """The journal's header and the entries it still lists as live, keyed by (kind, value)."""
    header: dict = {}
    live: dict[tuple[str, str], dict] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue        # a line cut short by the kill
                if rec.get("op") == "session":
                    header = rec
                elif rec.get("op") == "+":
                    live[(rec["kind"], rec["value"])] = rec
                elif rec.get("op") == "-":
                    live.pop((rec["kind"], rec["value"]), None)
                elif rec.get("op") == "watchdog":
                    header.setdefault("watchdog_killed", []).extend(rec.get("killed", []))
    except FileNotFoundError:
        pass
    return header, live


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def processes_with_cookie(token: str) -> list[int]:
    """PIDs (other than this one) whose environment says `BAKE_SESSION=token`."""
    needle = f"{COOKIE}={token}".encode()
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(pid)
    return found


def processes_rooted_in(root: str) -> list[int]:
    """PIDs whose root directory is `root` or lies below it."""
    real = os.path.realpath(root)
    found = []
    for pid in _pids():
        try:
            r = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if r == real or r.startswith(real.rstrip("/") + "/"):
            found.append(pid)
    return found


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for pid in _pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(pid)
        except OSError:
            continue
    return found


def end_processes(token: str, journal: str, *, same_boot: bool = True, patience: float = 10.0) -> list[int]:
    """SIGKILL every process of the bake `token` until none is left (or `patience` runs
    out); returns the PIDs that were killed. Process groups are only trusted on the boot
    that wrote them (`same_boot`): after a reboot their numbers belong to others."""
    killed: set[int] = set()
    deadline = time.monotonic() + patience
    while True:
        _, live = read_journal(journal)
        pids = set(processes_with_cookie(token))
        for (kind, value) in live:
            if kind == "chroot" and os.path.realpath(value) != "/":    # never the host's own root
                pids.update(processes_rooted_in(value))
            elif kind == "pgid" and same_boot:
                pids.update(processes_in_group(int(value)))
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            return sorted(killed)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    token, journal = argv[1], argv[2]
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    # Wait for the end of the pipe: the bake is gone, however it went.
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    killed = end_processes(token, journal)
    if killed:
        # Beside the journal, for the next bake's report of what it found.
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND)   # never re-created once the bake removed it
        except OSError:
            return 0
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": "watchdog", "killed": killed, "at": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
