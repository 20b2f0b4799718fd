"""Leases in Redis: a lock one holder at a time has, across build boxes, that ends on
its own when its holder stops renewing it.

A lease is a key `bake:lease:NAME` whose value names its holder (a random token, the
host, the pid, the build) and which expires `ttl` seconds after it was last renewed.
It is taken with SET NX (never waiting on Redis itself), renewed by a thread of its
holder every ttl/3, and checked (the value still carries the holder's token) before
anything is uploaded or registered: a holder that was paused or cut off longer than its
ttl finds its lease gone or someone else's, and stops instead of publishing.

Every taking, renewal and release is also written, with Redis' own clock, to the hash
`bake:lease-log:NAME` (one field per token: acquired, until, released), kept for a week:
`bake status` shows it, and it is how a test proves that no two holders overlapped.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable

from builder.core.errors import BakeError
from builder.core.locks import Busy
from builder.farm.connect import redis_from_url

log = logging.getLogger("bake.farm")

PREFIX = "bake:lease:"
LOG_PREFIX = "bake:lease-log:"
LOG_KEEP = 7 * 24 * 3600
DEFAULT_TTL = 60.0
FENCE_ENV = "BAKE_FARM_LEASE"   # a farm job's bake: JSON {"redis": URL, "name": lease name, "token": ...}

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3], 'NX') then
  local entry = cjson.decode(ARGV[2])
  entry['acquired'] = now
  entry['until'] = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return 1
end
return 0
"""

_RENEW = """
local v = redis.call('GET', KEYS[1])
if not v or cjson.decode(v)['token'] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local e = redis.call('HGET', KEYS[2], ARGV[1])
if e then
  local entry = cjson.decode(e)
  entry['until'] = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
end
return 1
"""

_RELEASE = """
local v = redis.call('GET', KEYS[1])
if not v or cjson.decode(v)['token'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('HGET', KEYS[2], ARGV[1])
if e then
  local entry = cjson.decode(e)
  entry['until'] = now
  entry['released'] = now
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
end
return 1
"""


class LeaseLost(BakeError):
    """The lease is no longer this holder's: it expired, or another holder has it."""


def holder(conn, name: str) -> dict[str, Any] | None:
    """Who holds the lease `name` now (its value), None when nobody does."""
    raw = conn.get(PREFIX + name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"token": None, "holder": raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)}


def history(conn, name: str) -> list[dict[str, Any]]:
    """Every holder of the lease `name` in the last week, oldest first: token, host,
    pid, what, acquired and until (Redis time, ms), released when it was let go."""
    entries = []
    for token, raw in (conn.hgetall(LOG_PREFIX + name) or {}).items():
        e = json.loads(raw)
        e["token"] = token.decode() if isinstance(token, bytes) else token
        entries.append(e)
    return sorted(entries, key=lambda e: e["acquired"])


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "nobody"
    return f"{info.get('what') or 'a bake'} on {info.get('host', '?')} (pid {info.get('pid', '?')})"


class Lease:
    """The lease `name`, taken for `what` (said to anyone who finds it held)."""

    def __init__(self, conn, name: str, *, ttl: float = DEFAULT_TTL, what: str = "", extra: dict | None = None):
        self.conn, self.name, self.ttl = conn, name, float(ttl)
        self.token = secrets.token_hex(12)
        self.info = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
                     **(extra or {})}
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquire = conn.register_script(_ACQUIRE)
        self._renew = conn.register_script(_RENEW)
        self._release = conn.register_script(_RELEASE)

    @property
    def keys(self) -> list[str]:
        return [PREFIX + self.name, LOG_PREFIX + self.name]

    @property
    def spec(self) -> dict[str, Any]:
        """What another process needs to check this lease (`check_spec`)."""
        return {"name": self.name, "token": self.token}

    def try_acquire(self) -> bool:
        self.held = bool(self._acquire(keys=self.keys, args=[self.token, json.dumps(self.info),
                                                             int(self.ttl * 1000), LOG_KEEP]))
        return self.held

    def acquire(self, *, wait: bool = True, timeout: float | None = None, poll: float = 0.5,
                on_wait: Callable[[dict | None], None] | None = None) -> None:
        """Take the lease. Held by another: raise locks.Busy (`wait=False`), or try again
        every `poll` seconds until it is free (or `timeout` passes: Busy)."""
        if self.try_acquire():
            return
        other = holder(self.conn, self.name)
        if not wait:
            raise Busy(f"the farm lease {self.name}", describe(other))
        if on_wait:
            on_wait(other)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() > deadline:
                raise Busy(f"the farm lease {self.name}", describe(holder(self.conn, self.name)))
            time.sleep(poll)

    def renew(self) -> bool:
        ok = bool(self._renew(keys=self.keys, args=[self.token, int(self.ttl * 1000)]))
        if not ok:
            self.held = False
        return ok

    def check(self, what: str) -> None:
        """Raise LeaseLost unless this holder still has the lease (before `what`)."""
        check_spec(self.conn, self.spec, what)

    def release(self) -> None:
        self.stop_renewing()
        if self.held:
            try:
                self._release(keys=self.keys, args=[self.token])
            finally:
                self.held = False

    def keep(self, on_lost: Callable[[str], None] | None = None) -> None:
        """Renew the lease every ttl/3 in a thread until `release`; when a renewal finds
        it gone, record why in `lost` and call `on_lost(why)` once."""
        def loop():
            while not self._stop.wait(self.ttl / 3):
                try:
                    if self.renew():
                        continue
                    why = f"the farm lease {self.name} expired or was taken by {describe(holder(self.conn, self.name))}"
                except Exception as e:       # Redis unreachable: keep trying until the lease would be gone
                    log.warning("could not renew the farm lease %s: %s", self.name, e)
                    continue
                self.lost = why
                log.error("%s", why)
                if on_lost:
                    on_lost(why)
                return
        self._thread = threading.Thread(target=loop, name=f"lease {self.name}", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> "Lease":
        self.acquire()
        self.keep()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_env(what: str) -> None:
    """Raise LeaseLost when this bake runs for a farm (its lease is in FENCE_ENV) and no
    longer holds that lease; pass when there is none."""
    raw = os.environ.get(FENCE_ENV)
    if not raw:
        return
    spec = json.loads(raw)
    conn = redis_from_url(spec["redis"])
    try:
        check_spec(conn, spec, what)
    finally:
        conn.close()


def check_spec(conn, spec: dict[str, Any], what: str) -> None:
    """Raise LeaseLost unless the lease `spec["name"]` still carries `spec["token"]`."""
    now = holder(conn, spec["name"])
    if not now or now.get("token") != spec["token"]:
        raise LeaseLost(f"not {what}: this build no longer holds the farm lease {spec['name']} "
                        f"(now held by {describe(now)}); another holder may be publishing this recipe")
