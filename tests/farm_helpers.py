"""A build farm on one machine for the tests: Debian's redis-server on 127.0.0.1 (a free
port, no persistence, so a restart is a Redis lost with everything in it), the store
on the Eucalyptus stand-in, and `bake worker` processes, each a "box" of its own (its
own output folder and stage cache)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from conftest import BAKE
from events import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "a")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "no"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_for(lambda: _answers(self.port) or self.proc.poll() is not None, 60, "redis-server to answer")
        assert self.proc.poll() is None, (self.folder / "redis.log").read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_empty(self) -> None:
        """Redis lost: killed, and started again with nothing in it."""
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def store_url() -> str:
    return f"s3://bake-farm-{secrets.token_hex(4)}/farm"


@dataclass
class Worker:
    """One `bake worker`, a box of its own: output and stage cache under `folder`."""

    name: str
    folder: Path
    proc: subprocess.Popen

    @property
    def output(self) -> Path:
        return self.folder / "output"

    def stop(self, timeout: float = 300) -> None:
        """A warm shutdown (SIGTERM: the job under way ends first), then SIGKILL of the
        group if it does not end in `timeout`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_worker(name: str, folder: Path, redis: RedisServer, store: str, cloud_env: dict[str, str], *,
                 lease_ttl: int = 20, heartbeat: int = 5, maintenance: int = 10) -> Worker:
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **cloud_env, BAKE_CACHE=str(folder / "cache"))
    for k in ("BAKE_FARM_SHARED_CACHE", "BAKE_FARM_LEASE"):
        env.pop(k, None)
    log = open(folder / "worker.log", "a")
    proc = subprocess.Popen(
        [BAKE, "worker", "--redis", redis.url, "--store", store, "--output", str(folder / "output"), "--name", name,
         "--lease-ttl", str(lease_ttl), "--heartbeat", str(heartbeat), "--maintenance-interval", str(maintenance)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    log.close()
    wait_for(lambda: f"bake worker {name}:" in (folder / "worker.log").read_text() or proc.poll() is not None, 120,
             f"worker {name} to start")
    assert proc.poll() is None, (folder / "worker.log").read_text()
    return Worker(name, folder, proc)


def overlaps(history: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of lease holders whose times (taken, then released or expired) overlap."""
    out = []
    ordered = sorted(history, key=lambda e: e["acquired"])
    for a, b in zip(ordered, ordered[1:]):
        if b["acquired"] < a["until"]:
            out.append((a, b))
    return out
