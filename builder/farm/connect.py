"""Where the farm is: its Redis (the queue, leases, job state: all of which may be lost)
and its store in Walrus/S3 (records, logs, artifacts, the stage cache: what must not).

Each comes from its option, else the environment: `BAKE_REDIS_URL`
(redis://HOST:PORT/DB) and `BAKE_FARM_STORE` (s3://BUCKET/PREFIX, on the cloud named by
S3_URL and the keys, or an eucarc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from builder.core.errors import BakeError

REDIS_ENV = "BAKE_REDIS_URL"
STORE_ENV = "BAKE_FARM_STORE"
EUCARC_ENV = "BAKE_FARM_EUCARC"
QUEUE = "bake"
# RQ's JSONSerializer on every Queue, Worker and Job fetch: a job is data, never pickle
# (farm/trust.py says why)
SERIALIZER = "json"


def shown(url: str) -> str:
    """`url` as it may be printed and written down: its password (if any) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redis_from_url(url: str):
    """A Redis client for `url`, checked to answer (a BakeError saying where it looked)."""
    import redis  # noqa: PLC0415 (redis: only the farm's commands and a farm job's bake load it)

    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=10, health_check_interval=30)
        conn.ping()
    except ValueError as e:
        raise BakeError(f"the farm's Redis {shown(url)!r}: {e}") from None
    except redis.exceptions.RedisError as e:
        raise BakeError(f"cannot reach the farm's Redis at {shown(url)} ({e}); is redis-server running there, and "
                        f"is {REDIS_ENV} (or --redis) right?") from None
    return conn


@dataclass
class Farm:
    redis_url: str
    store_url: str
    eucarc: str | None = None

    @classmethod
    def from_args(cls, args, *, need_redis: bool = True) -> "Farm":
        redis_url = getattr(args, "redis", None) or os.environ.get(REDIS_ENV) or ""
        store_url = getattr(args, "store", None) or os.environ.get(STORE_ENV) or ""
        eucarc = getattr(args, "eucarc", None) or os.environ.get(EUCARC_ENV) or None
        missing = []
        if need_redis and not redis_url:
            missing.append(f"its Redis (--redis or {REDIS_ENV})")
        if not store_url:
            missing.append(f"its store (--store or {STORE_ENV}, s3://BUCKET/PREFIX)")
        if missing:
            raise BakeError("the farm needs " + " and ".join(missing))
        return cls(redis_url, store_url, eucarc)

    def redis(self):
        return redis_from_url(self.redis_url)

    def store(self):
        from builder.cloud.objects import ObjectStore  # noqa: PLC0415 (boto3: only when the store is reached)
        return ObjectStore.from_url(self.store_url, eucarc=self.eucarc)

    def env(self) -> dict[str, str]:
        """The variables that tell a bake run by a worker where its farm is."""
        env = {REDIS_ENV: self.redis_url, STORE_ENV: self.store_url}
        if self.eucarc:
            env[EUCARC_ENV] = self.eucarc
        return env
