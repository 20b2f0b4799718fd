"""Cloud credentials and endpoints: from a Eucalyptus eucarc, the usual environment
variables, or a recipe's `publish` section naming them.

Secrets (the secret key) never leave this object: its repr hides them, `describe()`
gives what may be logged or written to build.json, and error messages name variables
and files, never values.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..bundle.keys import FIELDS as BUNDLE_FIELDS, PATH_FIELDS
from builder.core.errors import BakeError

# Environment variable names, first one found wins (euca2ools' and ec2-api-tools' names);
# those of the bundling certificates, key and account are the bundle's own.
ENV_NAMES = {
    "ec2_url": ("EC2_URL",),
    "s3_url": ("S3_URL",),
    "access_key": ("EC2_ACCESS_KEY", "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "secret_key": ("EC2_SECRET_KEY", "AWS_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    **{name: env_names for name, (env_names, _, _) in BUNDLE_FIELDS.items()},
}
# Which cloud and who we are to it: these four always come from one place.
CLOUD_FIELDS = ("ec2_url", "s3_url", "access_key", "secret_key")


@dataclass(frozen=True)
class Credentials:
    """Where the cloud is and who we are to it."""

    ec2_url: str
    s3_url: str
    access_key: str
    secret_key: str = field(repr=False)
    user_id: str | None = None          # account number, 12 digits (bundling)
    cert: Path | None = None            # EC2_CERT: the user's certificate (bundling)
    private_key: Path | None = None     # EC2_PRIVATE_KEY (bundling)
    cloud_cert: Path | None = None      # EUCALYPTUS_CERT (bundling)
    eucalyptus_version: str | None = None   # "3", "4.2", ...; None: inferred from the URLs
    region: str = "eucalyptus"
    source: str = "environment"         # where these came from, for messages

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"Credentials({shown.replace(repr(self.access_key), repr(mask(self.access_key)))}, secret_key=<hidden>)"

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """What may be logged or recorded: endpoints, the masked access key, the source."""
        return {"ec2_url": self.ec2_url, "s3_url": self.s3_url, "access_key": mask(self.access_key),
                "eucalyptus_version": self.profile_version, "source": self.source}

    @property
    def profile_version(self) -> str:
        """Which client set-up the cloud needs: "3" (EC2 SigV2, Walrus HmacV1), "4.0-4.3"
        (EC2 SigV4, object storage HmacV1), "4.4+" (SigV4 for both) or "aws".

        Object storage accepts SigV4 only from Eucalyptus 4.4, so without an explicit
        `eucalyptus_version` a 4.x cloud (told by its /services/compute or
        /services/objectstorage URL) gets HmacV1, which every 4.x accepts; any other
        Eucalyptus URL gets the 3.x set-up, which every release accepts."""
        if self.eucalyptus_version:
            major, _, rest = self.eucalyptus_version.strip().partition(".")
            minor = int(rest.split(".")[0]) if rest.split(".")[0].isdigit() else 0
            if not major.isdigit() or int(major) < 4:
                return "3"
            return "4.4+" if int(major) > 4 or minor >= 4 else "4.0-4.3"
        paths = urlsplit(self.ec2_url).path.rstrip("/"), urlsplit(self.s3_url).path.rstrip("/")
        if paths[0].endswith("/services/compute") or paths[1].endswith("/services/objectstorage"):
            return "4.0-4.3"
        if "/services/" in paths[0] or "/services/" in paths[1]:
            return "3"
        return "aws"

    @property
    def can_bundle(self) -> bool:
        """Whether the user's certificate and key, the cloud's certificate and the account
        are all named (bundling for this cloud is possible)."""
        return all((self.cert, self.private_key, self.cloud_cert, self.user_id))

    def require_bundling(self) -> None:
        """Raise unless the keys and certificates needed to bundle are all named and readable."""
        missing = [ENV_NAMES[n][0] for n in ("cert", "private_key", "cloud_cert", "user_id") if not getattr(self, n)]
        if missing:
            raise BakeError(f"bundling needs {', '.join(missing)} (from {self.source}); set them or use an eucarc")
        for n in PATH_FIELDS:
            p = getattr(self, n)
            if not Path(p).is_file():
                raise BakeError(f"{ENV_NAMES[n][0]}={p} (from {self.source}): no such file")


def mask(key: str) -> str:
    """An access key shown as its first 4 and last 4 characters."""
    return key if len(key) <= 8 else f"{key[:4]}…{key[-4:]}"


_EXPORT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def parse_eucarc(path: str | os.PathLike) -> dict[str, str]:
    """The variables an eucarc sets, `${EUCA_KEY_DIR}` (and other variables it set
    earlier) expanded; `echo WARN: …`, aliases and other commands are ignored.
    EUCA_KEY_DIR is the eucarc's own directory, as the `$(cd $(dirname …); pwd -P)` line says."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise BakeError(f"{path}: cannot read the eucarc: {e.strerror}") from None
    values = {"EUCA_KEY_DIR": str(path.resolve().parent)}
    for n, line in enumerate(text.splitlines(), 1):
        m = _EXPORT.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        name, raw = m.groups()
        if name == "EUCA_KEY_DIR":
            continue  # computed above; the file's line is a shell command substitution
        try:
            words = shlex.split(raw, comments=True)
        except ValueError:
            raise BakeError(f"{path}:{n}: cannot parse the value of {name}") from None
        value = words[0] if words else ""
        single_quoted = raw.strip().startswith("'")
        if not single_quoted:
            def expand(mm: re.Match[str]) -> str:
                var = mm.group(1) or mm.group(2)
                return values.get(var, os.environ.get(var, ""))

            value = _VAR.sub(expand, value)
        values[name] = value
    return values


def _pick(source: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for n in names:
        if source.get(n):
            return source[n]
    return None


def load_credentials(publish: Mapping[str, Any] | None = None, *,
                     environ: Mapping[str, str] | None = None,
                     eucarc: str | os.PathLike | None = None) -> Credentials | None:
    """Credentials from, in increasing priority: the environment, an eucarc (`eucarc`
    argument or the section's `eucarc` key), and the recipe's `publish` section
    (`ec2_url`, `s3_url`, `access_key_env`/`secret_key_env` naming variables,
    `eucalyptus_version`).

    A named eucarc is where the endpoints and keys come from (the recipe's section may
    still override them; the environment may only add the bundling certificates): a
    BakeError names the file and the variables it lacks. Without one: None when no cloud
    is configured at all, a BakeError naming what is missing when one is half configured."""
    publish = dict(publish or {})
    environ = os.environ if environ is None else environ
    values: dict[str, str | None] = {k: _pick(environ, names) for k, names in ENV_NAMES.items()}
    source = "environment"
    rc = eucarc or publish.get("eucarc")
    rc_path = Path(os.path.expandvars(str(rc))).expanduser() if rc else None
    rc_values: dict[str, str] = {}
    if rc_path is not None:
        rc_values = parse_eucarc(rc_path)
        # another cloud's endpoints or keys left in the environment must not fill the
        # eucarc's gaps: requests would go to one cloud signed for another
        values.update(dict.fromkeys(CLOUD_FIELDS))
        for k, names in ENV_NAMES.items():
            v = _pick(rc_values, names)
            if v:
                values[k] = v
        source = f"eucarc {rc}"
    for k in ("ec2_url", "s3_url"):
        if publish.get(k):
            values[k] = publish[k]
            source = "recipe publish section" if not rc else source + " + recipe"
    for k, key in (("access_key", "access_key_env"), ("secret_key", "secret_key_env")):
        var = publish.get(key)
        if var:
            if not environ.get(var):
                raise BakeError(f"the recipe's publish.{key} names ${var}, which is not set")
            values[k] = environ[var]
    missing = [ENV_NAMES[k][0] for k in CLOUD_FIELDS if not values[k]]
    if rc_path is not None and missing:
        needed = ", ".join(ENV_NAMES[k][0] for k in CLOUD_FIELDS)
        if not any(_pick(rc_values, ENV_NAMES[k]) for k in CLOUD_FIELDS):
            raise BakeError(f"{rc_path}: this eucarc sets none of {needed}, which bake needs to reach the cloud; "
                            "is it the eucarc from the cloud's credentials?")
        raise BakeError(f"{rc_path}: this eucarc does not set {', '.join(missing)} "
                        f"(bake needs {needed} to reach the cloud)")
    if len(missing) == len(CLOUD_FIELDS):
        return None
    if missing:
        raise BakeError(f"cloud credentials from {source} are incomplete: {', '.join(missing)} not set")
    for k in ("ec2_url", "s3_url"):
        if not re.match(r"^https?://", values[k] or ""):
            raise BakeError(f"{ENV_NAMES[k][0]} (from {source}) is not an http(s) URL: {values[k]!r}")
    return Credentials(
        ec2_url=values["ec2_url"].rstrip("/"), s3_url=values["s3_url"].rstrip("/"),  # type: ignore[union-attr]
        access_key=values["access_key"], secret_key=values["secret_key"],  # type: ignore[arg-type]
        user_id=(values["user_id"] or "").replace("-", "") or None,
        cert=Path(values["cert"]) if values["cert"] else None,
        private_key=Path(values["private_key"]) if values["private_key"] else None,
        cloud_cert=Path(values["cloud_cert"]) if values["cloud_cert"] else None,
        eucalyptus_version=str(publish["eucalyptus_version"]) if publish.get("eucalyptus_version") else None,
        source=source)
