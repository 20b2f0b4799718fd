"""A farm worker's start on its box: what killed work horses of this box left is removed,
and the name of a killed worker of this box is taken over."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from builder.core.errors import BakeError
from builder.core.removal import remove_tree
from .connect import SERIALIZER


def clean_job_folders(output: Path) -> list[str]:
    """Remove the job folders of work horses of this box that are gone."""
    removed: list[str] = []
    jobs = output / ".farm" / "jobs"
    if not jobs.is_dir():
        return removed
    for d in jobs.iterdir():
        pid = d.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove_tree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def take_name(conn, name: str) -> str | None:
    """Free the name of a worker of this box that was killed (it never said it died, and
    RQ keeps its name for the worker's TTL): marked dead, what was done is said. A
    live worker of that name, or one on another box, keeps it: a clear error."""
    from rq import Worker  # noqa: PLC0415 (rq: only the farm's commands load it)

    key = Worker.redis_worker_namespace_prefix + name
    seen = {k.decode(): v.decode(errors="replace") for k, v in conn.hgetall(key).items()}
    if not seen or "death" in seen:
        return None
    host, pid = seen.get("hostname", ""), int(seen.get("pid") or 0)
    if host != socket.gethostname():
        raise BakeError(f"a worker named {name} is registered from {host or 'another box'} (pid {pid}); "
                        f"give this one another --name")
    try:
        alive = b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        alive = False
    if alive:
        raise BakeError(f"a worker named {name} runs on this box already (pid {pid}); give this one another --name")
    found = Worker.find_by_key(key, connection=conn, serializer=SERIALIZER)
    if found is not None:
        found.register_death()
    return f"the worker {name} of this box (pid {pid}) was killed; its name is taken over"
