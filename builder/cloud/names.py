"""The names a build publishes under, and the check that they are its own.

Every build publishes into a folder of its own, `[PREFIX/]<recipe>/<build-id>/`, and
registers images named `[PREFIX-]<name>-<build-id>`: a recipe's `publish.prefix` (or
`--prefix`) is a folder above the builds, never a name they share. Each object a build
uploads carries its owner (`x-amz-meta-bake-build`: recipe, build id and a token made once
per build folder), so that two builds that would still meet on a name (two boxes baking
one recipe in the same second, or an `image_name` reused) are told apart before anything
is written: a publish that finds another build's object or image on a name it would use
refuses, and never overwrites or deregisters what is not its own.
"""

from __future__ import annotations

import secrets
from typing import Iterable


from builder.core.errors import BakeError
from builder.core.record import Build, and_list
from .clients import Clients
from .credentials import Credentials
from .inventory import head_object, keys_under, own_images

OWNER_META = "bake-build"       # x-amz-meta-bake-build on every object a publish or release puts
MAX_NAME = 110


def own_folder(build: Build) -> str:
    """`<recipe>/<build-id>`: the part of every name that is the build's alone."""
    return f"{build.dir.parent.name}/{build.id}"


def build_folder(build: Build, prefix: str | None) -> str:
    """The key prefix of the build's objects: `PREFIX/<recipe>/<build-id>`, or
    `<recipe>/<build-id>` without a prefix. A prefix that already ends with the build's
    own folder (a folder recorded by an earlier publish) is taken as it is."""
    own = own_folder(build)
    base = (prefix or "").strip("/")
    if base == own or base.endswith("/" + own):
        return base
    return f"{base}/{own}" if base else own


def image_name(build: Build, prefix: str | None, name: str | None) -> str:
    """The name of the build's machine image (its kernel and ramdisk add -kernel and
    -ramdisk): `[PREFIX-]NAME-<build-id>`, NAME the recipe's `image_name` or its name; cut
    to fit the cloud's limit from the front, so that the build id always stays."""
    base = (prefix or "").strip("/").replace("/", "-")
    head = "-".join(p for p in (base, name or build.dir.parent.name) if p)
    tail = f"-{build.id}"
    return head[:MAX_NAME - len(tail)] + tail


def owner_of(build: Build) -> str:
    """The owner tag of the build's objects, `<recipe>/<build-id>/<token>`; the token is
    made once and kept in build.json (`publish_owner`), so a publish resumed or repeated
    from the same folder is the same owner, and another folder never is."""
    tag = build.data.get("publish_owner")
    prefix = own_folder(build) + "/"
    if not isinstance(tag, str) or not tag.startswith(prefix):
        tag = prefix + secrets.token_hex(8)
        build.set("publish_owner", tag)
    return tag


def object_owner(clients: Clients, bucket: str, key: str, creds: Credentials) -> str | None:
    """The owner tag of bucket/key ("" for an object without one), None when there is no
    such object."""
    r = head_object(clients, bucket, key, creds)
    if r is None:
        return None
    meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
    return meta.get(OWNER_META, "")


def check_names_free(clients: Clients, creds: Credentials, *, bucket: str, folder: str, owner: str,
                     names: Iterable[str], locations: Iterable[str], recorded_folder: str | None) -> None:
    """Refuse (a BakeError, before anything is written) when an object in the build's
    folder or an image under one of its `names` is another build's. An object without an
    owner tag counts as the build's own only when build.json records this very folder
    (an object an earlier version of bake published for it)."""
    taken = []
    for key in keys_under(clients, bucket, folder, creds):
        who = object_owner(clients, bucket, key, creds)
        if who is None or who == owner or (who == "" and recorded_folder == folder):
            continue
        taken.append(f"{bucket}/{key} ({'of build ' + who.rpartition('/')[0] if who else 'of no known build'})")
    locations = set(locations)
    names = set(names)
    for im in own_images(clients, creds):
        if im.get("State") in ("deregistered", "failed"):
            continue
        location = str(im.get("ImageLocation") or "").lstrip("/")
        if im.get("Name") in names and location not in locations:
            taken.append(f"image name {im['Name']} ({im['ImageId']}, registered for {location or 'another image'})")
    if taken:
        shown = and_list(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise BakeError(f"publishing {owner.rpartition('/')[0]} refused: {shown} already belong(s) to another "
                        "build, and a publish never overwrites or deregisters another build's objects or images; "
                        "nothing was uploaded or registered (publish under another --prefix or image name)")
