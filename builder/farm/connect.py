"""Where the farm is: its Redis (the queue, leases, job state: all of which may be lost)
and its store in Walrus/S3 (records, logs, artifacts, the stage cache: what must not).

Each comes from its option, else the environment: `BAKE_REDIS_URL`
(redis://HOST:PORT/DB) and `BAKE_FARM_STORE` (s3://BUCKET/PREFIX, on the cloud named by
S3_URL and the keys, or an eucarc).

Redis's password never goes on a command line, where `ps` shows it to every user of the
box: `--redis` refuses a URL with one; it comes with the URL in `BAKE_REDIS_URL`, or
alone from `--redis-password-file FILE` (a file only its owner may read). A `rediss://`
URL speaks TLS, checking the server's certificate against the CA file its query
parameter `ssl_ca_certs` names (redis-py's own); a URL that turns that check off is
refused. A URL is printed and logged only through `shown`, with its password masked.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

from builder.core.errors import BakeError

REDIS_ENV = "BAKE_REDIS_URL"
STORE_ENV = "BAKE_FARM_STORE"
EUCARC_ENV = "BAKE_FARM_EUCARC"
QUEUE = "bake"
# RQ's JSONSerializer on every Queue, Worker and Job fetch: a job is data, never pickle
# (farm/trust.py says why)
SERIALIZER = "json"


def shown(url: str) -> str:
    """`url` as it may be printed and written down: its password (if any, in its user
    part or its query) masked."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if "password" in parse_qs(parts.query):
        parts = parts._replace(query="&".join("password=***" if p.split("=", 1)[0] == "password" else p
                                              for p in parts.query.split("&")))
    return urlunsplit(parts)


def without_password(url: str) -> str:
    """`url` with no password in it (its user kept)."""
    parts = urlsplit(url)
    if parts.password is not None:
        user, host = parts.username or "", parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}@{host}" if user else host)
    return urlunsplit(parts._replace(query="&".join(p for p in parts.query.split("&")
                                                    if p.split("=", 1)[0] != "password")))


def refuse_password(url: str) -> str:
    """`url` as given on a command line: a BakeError when it carries a password."""
    if urlsplit(url).password is not None or "password" in parse_qs(urlsplit(url).query):
        raise BakeError(f"refused: a Redis password on the command line is shown by `ps` to every user of this box; "
                        f"give --redis {without_password(url)} and the password in --redis-password-file FILE, or "
                        f"the whole URL in {REDIS_ENV}")
    return url


def read_password(path: str) -> str:
    """The password in the file `path` (its first line), which only its owner may read."""
    try:
        st = os.stat(path)
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BakeError(f"--redis-password-file {path}: cannot read it ({e})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BakeError(f"--redis-password-file {path}: others than its owner may read it (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if not lines or not lines[0]:
        raise BakeError(f"--redis-password-file {path}: empty; its first line is the farm Redis's password")
    return lines[0]


def with_password(url: str, password: str) -> str:
    """`url` with `password` in it (its user kept: `default` when it names none)."""
    parts = urlsplit(url)
    auth, _, host = parts.netloc.rpartition("@")
    user = auth.split(":", 1)[0] or "default"          # as written in the URL (quoted already)
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def check_tls(url: str) -> None:
    """A `rediss://` URL keeps its certificate check: a BakeError when its query turns it
    off, or names a CA file that cannot be read."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme.lower() != "rediss":
        tls = sorted(k for k in query if k.startswith("ssl_"))
        if tls:
            raise BakeError(f"the farm's Redis {shown(url)}: {', '.join(tls)} asks for TLS; use rediss://")
        return
    if query.get("ssl_cert_reqs", "required").lower() not in ("required", "cert_required"):
        raise BakeError(f"the farm's Redis {shown(url)}: ssl_cert_reqs={query['ssl_cert_reqs']} would take any "
                        "certificate; bake checks it (give the CA in ssl_ca_certs=FILE)")
    if query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no", "n", "f", "off"):
        raise BakeError(f"the farm's Redis {shown(url)}: ssl_check_hostname off would take another host's "
                        "certificate; bake checks it")
    ca = query.get("ssl_ca_certs")
    if ca is not None and not os.access(ca, os.R_OK):
        raise BakeError(f"the farm's Redis {shown(url)}: its CA file ssl_ca_certs={ca} cannot be read")


def redis_from_url(url: str):
    """A Redis client for `url`, checked to answer (a BakeError saying where it looked)."""
    import redis  # noqa: PLC0415 (redis: only the farm's commands and a farm job's bake load it)

    check_tls(url)
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
        password_file = getattr(args, "redis_password_file", None)
        if password_file and redis_url:
            redis_url = with_password(redis_url, read_password(password_file))
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
