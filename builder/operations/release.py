"""Releases: what `bake release BUILD [--public]` and `bake latest RECIPE [--released]`
do (their command lines are builder/cli/release.py's).

Only a build whose verification passed every check its recipe names is released
(`--allow-unverified` releases another, and its release notes say so). Releasing it
writes, in the build directory, what a person or a pipeline takes away with the image:

- `SHA256SUMS`: the kernel, ramdisk, partition image, bundle parts and manifests, in
  the format `sha256sum -c` checks (paths relative to the build directory);
- `sbom.spdx.json`: an SPDX 2.3 document of the image's Debian packages (name,
  version, architecture, source package, a `pkg:deb` purl each);
- `RELEASE-NOTES.md`: the packages added, removed, upgraded and downgraded since the
  recipe's previous release under the same output root;

marks the build released in its record (`released`: when, public or not, and those
files), so that `bake gc` keeps it, and rebuilds the stream index of released images
under the output root (`streams/v1/`, simplestreams v1, the format Ubuntu publishes its
cloud images in). With `--public` the EMI, EKI and ERI are first made launchable by
every account of the cloud. A published build's release is also said in its bucket:
the release marker (`released.json`, a copy of the record's `released` section) is put
beside its bundles, where `bake gc --cloud` finds it even without the build's record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from builder.core.atomic import write_text
from builder.core.errors import BakeError
from builder.core.log import step
from builder.core.record import Build, and_list, sha256_file
from builder.operations import attest
from builder.operations.buildlock import name_lock
from builder.operations.packages import package_changes
from builder.operations.records import find_builds, image_ids, load_build
from builder.operations.sbom import sbom
from builder.operations.streams import write_streams

SHA256SUMS = "SHA256SUMS"
SBOM = "sbom.spdx.json"
NOTES = "RELEASE-NOTES.md"
RELEASE_MARKER = "released.json"       # the name `bake gc --cloud` looks for beside a build's bundles
ROLES = ("kernel", "ramdisk", "image")


# --- may this build be released? --------------------------------------------------------

def not_passed(build: Build) -> list[str]:
    """The checks the recipe names for `build` (`required_checks`, as its verification
    recorded them) that passed in neither its last local nor its last cloud
    verification, in order; all of them when it was never verified."""
    data = build.data
    runs = [r for r in (data.get("verifications") or {}).values() if isinstance(r, dict)] \
        if isinstance(data.get("verifications"), dict) else []
    if not runs and isinstance(data.get("verify"), dict):
        runs = [data["verify"]]                 # a build verified before runs were kept by mode
    required: list[str] = []
    for run in runs:
        required += [c for c in run.get("required") or () if isinstance(c, str) and c not in required]
    if not required:
        # verified before the required checks were recorded: ask the recipe now
        from builder.verify import recipe_of, required_checks  # noqa: PLC0415 (the verify package loads the VM layer)
        required = required_checks(build, recipe_of(build))
    passed = {name for run in runs for name, status in (run.get("checks") or {}).items() if status == "pass"}
    return [c for c in required if c not in passed]


def refusal(build: Build, *, allow_unverified: bool = False) -> str | None:
    """Why `build` may not be released (None when it may): it must have finished, its
    verification must not have failed, and every check its recipe names must have
    passed; with `allow_unverified`, a build never verified, or not by every check, may
    be (its release notes say so)."""
    data = build.data
    where = build.dir
    result = data.get("result")
    verify = data.get("verify") if isinstance(data.get("verify"), dict) else None
    anyway = "; --allow-unverified releases it anyway, and its release notes say so"
    if result in (None, "running"):
        return f"{where} is not a finished build (its bake is running or was killed); only a verified build is released"
    if verify is None and not allow_unverified:
        return (f"{where} was never verified: run `bake verify {where}` first; only a build whose verification "
                f"passed every check its recipe names is released{anyway}")
    if verify is not None:
        checks = verify.get("checks") if isinstance(verify.get("checks"), dict) else {}
        failed = sorted(name for name, status in checks.items() if status == "fail")
        if verify.get("result") != "passed" or failed:
            which = f" (failed: {', '.join(failed)})" if failed else ""
            return (f"{where}: its verification failed{which}; see "
                    f"{where / str(verify.get('report') or 'verify.json')}, fix the image and verify it again")
    if result == "failed":
        at = f" at {data['failed_stage']}" if data.get("failed_stage") else ""
        return f"{where} failed{at}: {data.get('error', '')}"
    if verify is not None and not allow_unverified:
        missing = not_passed(build)
        if missing:
            return (f"{where}: its verification did not pass every check its recipe names: {and_list(missing)} "
                    f"did not pass (skipped, or left out with --checks); run `bake verify {where}` with every "
                    f"check{anyway}")
    return None


def check_releasable(build: Build, *, public: bool = False, allow_unverified: bool = False) -> None:
    """A BakeError saying why `build` may not be released (see `refusal`), or is released
    already (again only to make it public)."""
    why = refusal(build, allow_unverified=allow_unverified)
    if why:
        raise BakeError(why)
    already = build.data.get("released")
    if already and (not public or (isinstance(already, dict) and already.get("public"))):
        at = already.get("at", "?") if isinstance(already, dict) else "?"
        raise BakeError(f"{build.dir} was released already ({at})"
                        + ("" if public else "; `bake release --public` makes its images public"))


# --- SHA256SUMS ----------------------------------------------------------------------------

def released_files(build: Build) -> list[tuple[str, Path]]:
    """(role, path) of every file a release covers: kernel, ramdisk, image, then each
    bundle's parts and manifest. A BakeError names what is missing."""
    found = build.require_outputs(*ROLES)
    files = [(role, found[role]) for role in ROLES]
    bundle: dict[str, Any] = build.data["bundle"] if isinstance(build.data.get("bundle"), dict) else {}
    for role in ROLES:
        entry = bundle.get(role)
        if not isinstance(entry, dict):
            continue
        for i, part in enumerate(entry.get("parts") or []):
            files.append((f"{role} bundle part {i}", build.dir / part["path"]))
        if entry.get("manifest"):
            files.append((f"{role} bundle manifest", build.dir / entry["manifest"]))
    missing = [f"{p} (its {what})" for what, p in files if not p.is_file()]
    if missing:
        raise BakeError(f"{build.dir}: recorded but missing: {and_list(missing)}; bundle the build again")
    return files


def sha256sums(build: Build) -> tuple[str, str]:
    """The text of SHA256SUMS for the build and the image's digest. The kernel, ramdisk
    and image must be the files the build recorded (and so the ones verified): one
    changed since is a BakeError."""
    lines, image_digest, changed = [], "", []
    outputs = build.data.get("outputs") or {}
    for what, path in released_files(build):
        digest = sha256_file(path)
        if what in ROLES:
            if outputs[what].get("sha256") and outputs[what]["sha256"] != digest:
                changed.append(f"{path.name} (its {what})")
            if what == "image":
                image_digest = digest
        lines.append(f"{digest}  {path.relative_to(build.dir).as_posix()}\n")
    if changed:
        them = "it" if len(changed) == 1 else "them"
        raise BakeError(f"{build.dir}: {and_list(changed)} changed since the build recorded {them}; "
                        "what was verified is not what would be released: bake it again")
    return "".join(lines), image_digest


# --- release notes -------------------------------------------------------------------------

def previous_release(build: Build) -> Build | None:
    """The newest other released build of the same recipe under the same output root."""
    builds, _ = find_builds(build.dir.parent.parent, build.dir.parent.name)
    released = [s for s in builds if s.released and s.dir.resolve() != build.dir.resolve()]
    if not released:
        return None
    newest = max(released, key=lambda s: (str((s.released or {}).get("at", "")) if isinstance(s.released, dict) else "",
                                          builds.index(s)))
    return load_build(newest.dir)


def release_notes(build: Build, previous: Build | None, *, at: str, public: bool,
                  unverified: list[str] | None = None) -> str:
    """The release notes (Markdown) of `build`, against the `previous` release;
    `unverified`: the checks it was released without (--allow-unverified)."""
    recipe = build.dir.parent.name
    packages = build.data.get("packages") or []
    verify = build.data.get("verify") or {}
    checks = verify.get("checks") or {}
    passed = [n for n, s in checks.items() if s == "pass"]
    skipped = [n for n, s in checks.items() if s == "skip"]
    ids = image_ids(build)
    lines = [f"# {recipe} {build.id}", "",
             (f"Released {at} from build {build.id} of recipe {recipe} "
              f"({build.data.get('release', '?')}, {build.data.get('arch', '?')}, kernel "
              f"{build.data.get('kernel_version', '?')}, {len(packages)} packages)."), ""]
    if ids["emi"]:
        lines += [f"Images: EMI {ids['emi']}, EKI {ids['eki'] or '-'}, ERI {ids['eri'] or '-'}"
                  + (" (launchable by every account)." if public else " (private to the publishing account)."), ""]
    else:
        lines += ["Not published to a cloud.", ""]
    if not verify:
        lines += ["**Released unverified** (`--allow-unverified`): this build was never verified.", ""]
    else:
        lines += [f"Verified {verify.get('mode', '?')}"
                  + (f" ({verify['accelerator']})" if verify.get("accelerator") else "")
                  + f": {', '.join(passed)} passed" + (f"; {', '.join(skipped)} skipped" if skipped else "") + ".", ""]
        if unverified:
            lines += [(f"**Released without full verification** (`--allow-unverified`): {', '.join(unverified)} "
                       "did not pass."), ""]
    if previous is None:
        lines += ["## Packages", "", f"First release of {recipe}: there is no earlier release to compare with.", ""]
        return "\n".join(lines)
    previous_released = previous.data.get("released")
    prev_at = previous_released.get("at", "?") if isinstance(previous_released, dict) else "?"
    changes = package_changes(previous.data.get("packages") or [], packages)
    lines += [f"## Changes since {previous.id}", "",
              f"Compared with the release of build {previous.id} ({prev_at}).", ""]
    sections = (("Added", [f"{n} {v}" for n, v in changes.added]),
                ("Removed", [f"{n} {v}" for n, v in changes.removed]),
                ("Upgraded", [f"{n} {o} → {v}" for n, o, v in changes.upgraded]),
                ("Downgraded", [f"{n} {o} → {v}" for n, o, v in changes.downgraded]))
    if not any(items for _, items in sections):
        lines += ["No package was added, removed or changed.", ""]
    for title, items in sections:
        if items:
            lines += [f"### {title} ({len(items)})", "", *(f"- {item}" for item in items), ""]
    return "\n".join(lines)


# --- release ----------------------------------------------------------------------------

def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def check_same_cloud(build: Build, creds) -> None:
    """A BakeError unless `creds` name the cloud the build was published to."""
    cloud = build.data.get("cloud") or {}
    if cloud.get("ec2_url") and cloud["ec2_url"].rstrip("/") != creds.ec2_url.rstrip("/"):
        raise BakeError(f"{build.dir} was published to {cloud['ec2_url']}, but the credentials ({creds.source}) "
                        f"name {creds.ec2_url}")


def put_release_marker(build: Build, creds, marker: Path) -> str:
    """Upload `marker` beside the build's bundles (`BUCKET/PREFIX/released.json`);
    returns "BUCKET/KEY"."""
    # the cloud's clients import boto3: only a release of a published build loads it
    from builder.cloud.clients import make_clients  # noqa: PLC0415
    from builder.cloud.publish import PublishOptions  # noqa: PLC0415
    from builder.cloud.names import OWNER_META  # noqa: PLC0415
    from builder.cloud.store import upload_file  # noqa: PLC0415

    cloud = build.data.get("cloud") or {}
    bucket, prefix = cloud["bucket"], str(cloud.get("prefix") or "").strip("/")
    key = f"{prefix}/{marker.name}" if prefix else marker.name
    owner = build.data.get("publish_owner")
    with step(f"Putting the release marker at {bucket}/{key}"):
        upload_file(make_clients(creds), marker, bucket, key, PublishOptions(), creds,
                    metadata={OWNER_META: owner} if isinstance(owner, str) else None)
    return f"{bucket}/{key}"


def make_public(build: Build, creds) -> list[str]:
    """Grant launch permission to all on the build's EMI, EKI and ERI, and check that the
    cloud says so. Returns the ids."""
    # the cloud's clients import boto3: only a release of a published build loads it
    from builder.cloud.clients import make_clients  # noqa: PLC0415
    from builder.cloud.images import grant_public_launch, launch_permissions  # noqa: PLC0415

    ids = [i for i in image_ids(build).values() if i]
    if not image_ids(build)["emi"]:
        raise BakeError(f"{build.dir} was not published: `bake publish {build.dir}` first; --public grants "
                        "launch permission on its EMI, EKI and ERI")
    check_same_cloud(build, creds)
    clients = make_clients(creds)
    with step(f"Granting launch permission to all on {', '.join(ids)}"):
        for image_id in ids:
            grant_public_launch(clients, image_id, creds)
        private = [i for i in ids if {"Group": "all"} not in launch_permissions(clients, i, creds)]
    if private:
        raise BakeError(f"the cloud accepted the launch permission but does not list it on {and_list(private)}")
    return ids


def release(build: Build, *, public: bool = False, creds=None, allow_unverified: bool = False,
            sign: str | None = None) -> dict[str, Any]:
    """Release `build` (see the module's description), holding its lock. `creds` (cloud
    Credentials) are needed with `public`; `allow_unverified` releases a build not
    verified by every check its recipe names (see `refusal`); `sign` names the GnuPG key
    that signs the release (builder/operations/attest.py). Returns the build's
    `released` section.

    It holds the build by its folder and by its name (`buildlock`), as `bake gc` does
    before it deletes: a gc that comes after reads the release, one that came before has
    taken the build away (and the release is refused for a folder that is gone)."""
    with build.lock(), name_lock(build.dir.parent.name, build.id):
        build.data = Build.load(build.dir).data     # as it is now that nobody else works on it
        check_releasable(build, public=public, allow_unverified=allow_unverified)
        fingerprint = attest.signing_key(sign) if sign else None     # before anything is written
        unverified = not_passed(build)
        published = bool((build.data.get("cloud") or {}).get("bucket")) and bool(image_ids(build)["emi"])
        if (public or published) and creds is None:
            why = ("--public grants launch permission on its images" if public else
                   "its release marker is put beside its bundles, so that gc on the cloud keeps its images")
            raise BakeError(f"{build.dir} was published to {(build.data.get('cloud') or {}).get('ec2_url', 'a cloud')}"
                            f" and {why}: source its eucarc (or pass --eucarc), or set EC2_URL, S3_URL, "
                            "EC2_ACCESS_KEY and EC2_SECRET_KEY")
        if published:
            check_same_cloud(build, creds)
        at = _now()
        with step(f"Release {build.dir.parent.name}/{build.id}"):
            sums, image_digest = sha256sums(build)
            doc = sbom(build, image_digest, at.strftime("%Y-%m-%dT%H:%M:%SZ"))
            previous = previous_release(build)
            if public:
                make_public(build, creds)
            notes = release_notes(build, previous, at=at.isoformat(), public=public, unverified=unverified)
            for name, text in ((SHA256SUMS, sums), (SBOM, json.dumps(doc, indent=2) + "\n"), (NOTES, notes)):
                write_text(build.dir / name, text)
            released = {"at": at.isoformat(), "public": public, "sha256sums": SHA256SUMS, "sbom": SBOM,
                        "notes": NOTES, "previous": previous.id if previous else None, "images": image_ids(build),
                        "verified": "never" if not build.data.get("verify") else ("partly" if unverified else "fully"),
                        "unverified_checks": unverified}
            if fingerprint:
                with step(f"Signing the release with {fingerprint}"):
                    released["signed"] = attest.sign_release(build, build.dir / SHA256SUMS, fingerprint)
            if published:
                marker = build.dir / RELEASE_MARKER
                write_text(marker, json.dumps({"recipe": build.dir.parent.name, "build_id": build.id,
                                                      **released}, indent=2) + "\n")
                released.update(marker=RELEASE_MARKER, marker_at=put_release_marker(build, creds, marker))
            build.data["released"] = released
            build.save()
    signer = (lambda text: attest.clearsign(text, fingerprint)) if fingerprint else None
    write_streams(build.dir.parent.parent, sign=signer)
    return build.data["released"]


# --- latest -----------------------------------------------------------------------------

def latest(output_root: str | os.PathLike, recipe: str, *, released: bool = False) -> dict[str, Any]:
    """The newest build of `recipe` under `output_root` that has image ids (with
    `released`, the newest released one that has): its id, directory and EMI/EKI/ERI.
    A BakeError when there is none."""
    builds, _ = find_builds(output_root, recipe)
    for s in reversed(builds):
        if s.cloud.get("emi") and (s.released or not released):
            rel = s.released if isinstance(s.released, dict) else {}
            return {"recipe": s.recipe, "build_id": s.build_id, "dir": str(s.dir), **s.cloud,
                    "released": rel.get("at") if s.released else None, "public": bool(rel.get("public"))}
    if not builds:
        raise BakeError(f"no builds of {recipe} under {output_root}")
    what = "released build" if released else "build"
    raise BakeError(f"no {what} of {recipe} under {output_root} has image ids"
                    + (" (none was released after publishing)" if released else " (none was published)"))
