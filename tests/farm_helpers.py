"""A build farm on one machine, for the tests and for bench/bench_farm.py: Debian's
redis-server on 127.0.0.1 (a free port, no persistence, so a restart is a Redis lost
with everything in it), the store on the Eucalyptus stand-in, `bake worker` processes
each a "box" of its own (its own output folder and stage cache), and the small recipes
they bake. Failures are AssertionErrors that say what was seen."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from builder.core.record import sha256_file
from events import wait_for

BAKE = str(Path(sys.executable).parent / "bake")
WAITING, GO = "tmp/farm-waiting", "tmp/farm-go"     # the slow recipe's marks in its chroot
FARM_ENV = ("BAKE_FARM_SHARED_CACHE", "BAKE_FARM_LEASE", "BAKE_REDIS_URL", "BAKE_FARM_STORE", "BAKE_FARM_EUCARC",
            "BAKE_FARM_KEY_FILE")


def farm_key(folder: Path) -> Path:
    """The farm key file of the farm whose boxes are under `folder` (made once, mode 600):
    every box of one farm holds the same key."""
    path = folder / "farm.key"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int, password: str | None = None) -> bool:
    hello = (f"AUTH {password}\r\n" if password else "") + "PING\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(hello.encode())
            seen = b""
            while b"PONG" not in seen and b"-" not in seen:
                got = s.recv(64)
                if not got:
                    break
                seen += got
            return b"+PONG" in seen
    except OSError:
        return False


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


@dataclass
class RedisServer:
    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    password: str | None = None         # --requirepass, for the default user

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "redis.log", "a") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--protected-mode", "no",
                 *(["--requirepass", self.password] if self.password else [])], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: _answers(self.port, self.password) or self.proc.poll() is not None, 60, "redis-server to answer")
        assert self.proc.poll() is None, f"redis-server exited {self.proc.returncode}:\n{tail(self.folder / 'redis.log')}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_empty(self) -> None:
        """Redis lost: killed, and started again with nothing in it."""
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server(folder: Path, password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(folder, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def store_url(label: str = "farm") -> str:
    return f"s3://bake-{label}-{secrets.token_hex(4)}/farm"


@dataclass
class Worker:
    """One `bake worker`, a box of its own: output and stage cache under `folder`."""

    name: str
    folder: Path
    proc: subprocess.Popen

    @property
    def output(self) -> Path:
        return self.folder / "output"

    def stop(self, patience: float = 300) -> None:
        """SIGTERM (a warm shutdown: the job under way ends first); a second one after
        `patience` s (cold: RQ kills the work horse's group); then SIGKILL of the
        worker's group, where its scheduler may have outlived it."""
        if self.proc.poll() is None:
            for wait in (patience, 30):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


def start_worker(name: str, folder: Path, redis: RedisServer, store: str, cloud_env: dict[str, str], *,
                 lease_ttl: float = 20, heartbeat: int = 5, maintenance: int = 10) -> Worker:
    """`bake worker` for the box `folder` (started again there if it ran before); back
    once it says it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **cloud_env, BAKE_CACHE=str(folder / "cache"))
    for k in FARM_ENV:
        env.pop(k, None)
    # a password never goes on the command line (`ps` shows it): the URL with it goes in the environment
    where = ["--redis", redis.url] if redis.password is None else []
    if redis.password is not None:
        env["BAKE_REDIS_URL"] = redis.url
    env["BAKE_FARM_KEY_FILE"] = str(farm_key(folder.parent))
    logfile = folder / "worker.log"
    seen = logfile.stat().st_size if logfile.exists() else 0     # a restart reads its own lines only
    with open(logfile, "a") as log:
        proc = subprocess.Popen(
            [BAKE, "worker", *where, "--store", store, "--output", str(folder / "output"), "--name", name,
             "--lease-ttl", str(lease_ttl), "--heartbeat", str(heartbeat), "--maintenance-interval", str(maintenance)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    worker = Worker(name, folder, proc)

    def started() -> bool:
        with open(logfile, "rb") as f:
            f.seek(seen)
            return f"bake worker {name}:".encode() in f.read() or proc.poll() is not None
    try:
        wait_for(started, 120, f"worker {name} to start")
        assert proc.poll() is None, f"worker {name} exited {proc.returncode}:\n{tail(logfile)}"
    except BaseException:
        worker.stop(5)
        raise
    return worker


# --- the bases and the recipes ---------------------------------------------------------

def copy_base(demo: Path, dest: Path, mark: str | None = None) -> Path:
    """A copy of a build's trio and build.json in `dest`; with `mark`, one file more in
    its image (/etc/bake-<dest's name>, written with debugfs) and the record's digest
    made to match: another base, with its own cache key."""
    record = json.loads((demo / "build.json").read_text())
    dest.mkdir(parents=True)
    image = None
    for role in ("kernel", "ramdisk", "image"):
        src = demo / record["outputs"][role]["path"]
        subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
        if role == "image":
            image = dest / src.name
    if mark is not None:
        note = dest.parent / f"{dest.name}.mark"
        note.write_text(mark + "\n")
        r = subprocess.run(["debugfs", "-w", "-R", f"write {note} /etc/bake-{dest.name}", str(image)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"debugfs could not write into {image}: {r.stderr}"
        record["outputs"]["image"].update(sha256=sha256_file(image), size=image.stat().st_size)
    (dest / "build.json").write_text(json.dumps(record, indent=2))
    return dest


def write_recipe(folder: Path, name: str, base: Path, slow: bool = False) -> Path:
    """A small recipe on the build `base`, with a file of its own; bundle, publish and
    verify off (the stages up to the image are the farm's work). A slow one's command
    touches WAITING in its chroot and waits there until GO appears."""
    (folder / f"{name}.txt").write_text(f"{name}\n")
    data: dict[str, Any] = {
        "name": name, "release": "debian/bookworm", "base": {"image": str(base), "kernel": "from-source"},
        "files": [{"source": f"{name}.txt", "dest": f"/etc/{name}.txt"}],
        "bundle": {"enabled": False}, "publish": {"enabled": False}, "verify": {"enabled": False}}
    if slow:
        data["commands"] = [f"touch /{WAITING}; while [ ! -e /{GO} ]; do sleep 0.2; done; rm -f /{WAITING} /{GO}"]
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def waiting_roots(folder: Path, recipe: str) -> list[Path]:
    """The chroots, on any box under `folder`, in which `recipe`'s slow command waits now."""
    return [p.parents[1] for p in folder.glob(f"box-*/output/{recipe}/*/work/rootfs/{WAITING}")]


def overlaps(history: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of lease holders whose times (taken, then released or expired) overlap."""
    out = []
    ordered = sorted(history, key=lambda e: e["acquired"])
    for a, b in zip(ordered, ordered[1:]):
        if b["acquired"] < a["until"]:
            out.append((a, b))
    return out
