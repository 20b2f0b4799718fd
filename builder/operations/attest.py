"""Signed and attested releases (`bake release --sign KEY`, `bake release verify DIR
--keyring FILE`), with GnuPG (`gpg`, `gpgv`; GNUPGHOME is respected, and the key never
lives in the project).

A signed release has, beside the release's own files:

- `SHA256SUMS.gpg`: a detached, armored signature of SHA256SUMS
  (`gpg --verify SHA256SUMS.gpg SHA256SUMS`);
- `provenance.intoto.jsonl`: one DSSE envelope (signed with the same key over DSSE's
  pre-authentication encoding) holding an in-toto v1 statement whose predicate is SLSA
  v1 provenance: the subjects are the kernel, ramdisk, image and bundle manifests by
  sha256; the build definition names the recipe and every file it copies by digest, the
  base image's digest, the mirror and the packages; the run details name bake's version
  and the build host's tool versions;
- the stream index signed as simplestreams' clients read it: `streams/v1/index.sjson`
  (clearsigned, its product paths pointing at the `.sjson` products) and each products
  file's `.sjson`, so that `sstream-query --keyring FILE .../index.sjson` checks them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from builder.core import sh
from builder.core.errors import BakeError
from builder.core.record import Build, sha256_file
from builder.operations.sbom import purl
from builder.operations.streams import STREAMS

SUMS_SIGNATURE = "SHA256SUMS.gpg"
PROVENANCE = "provenance.intoto.jsonl"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
# What the build definition below means: a bake of a recipe (docs/releases.md says so).
BUILD_TYPE = "urn:bake:build-type:recipe:v1"
BUILDER_ID = "urn:bake:builder"


# --- GnuPG ---------------------------------------------------------------------------------

def _gpg(*args: str, what: str) -> sh.Result:
    sh.require("gpg")
    return sh.run(["gpg", "--batch", "--no-tty", *args], what=what, quiet=True)


def signing_key(spec: str) -> str:
    """The fingerprint of the one secret key `spec` names (a fingerprint, key id or user
    id) that can sign; a BakeError when there is none or more than one."""
    r = sh.run(["gpg", "--batch", "--no-tty", "--with-colons", "--list-secret-keys", "--", spec], check=False,
               quiet=True)
    fingerprints: list[str] = []
    capable = False
    for line in r.output.splitlines():
        fields = line.split(":")
        if fields[0] == "sec":
            capable = "s" in fields[11].lower() if len(fields) > 11 else False
        elif fields[0] == "fpr" and capable and not fingerprints[-1:] == [fields[9]]:
            fingerprints.append(fields[9])
            capable = False        # the primary key's fingerprint only
    home = os.environ.get("GNUPGHOME") or "~/.gnupg"
    if not fingerprints:
        raise BakeError(f"no secret key that can sign matches {spec!r} in {home} (gpg --list-secret-keys); "
                        "give its fingerprint, and GNUPGHOME if the key is in another home")
    if len(fingerprints) > 1:
        raise BakeError(f"{spec!r} matches {len(fingerprints)} secret keys in {home} ({', '.join(fingerprints)}); "
                        "give the fingerprint of one")
    return fingerprints[0]


def detach_sign(path: Path, fingerprint: str) -> Path:
    """`path`.gpg: an armored detached signature of `path`."""
    out = path.with_name(path.name + ".gpg")
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _gpg("--local-user", fingerprint, "--armor", "--detach-sign", "--output", str(tmp), str(path),
         what=f"signing {path.name}")
    os.replace(tmp, out)
    return out


def clearsign(text: str, fingerprint: str) -> str:
    """`text` clearsigned (gpg --clearsign)."""
    with tempfile.TemporaryDirectory(prefix="bake-sign-") as d:
        body, out = Path(d) / "body", Path(d) / "body.asc"
        body.write_text(text)
        _gpg("--local-user", fingerprint, "--clearsign", "--output", str(out), str(body), what="clearsigning")
        return out.read_text()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, what a DSSE signature signs."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_envelope(statement: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """`statement` in a DSSE envelope signed by `fingerprint` (a binary OpenPGP signature
    over the pre-authentication encoding)."""
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    with tempfile.TemporaryDirectory(prefix="bake-sign-") as d:
        body, sig = Path(d) / "pae", Path(d) / "pae.sig"
        body.write_bytes(pae(PAYLOAD_TYPE, payload))
        _gpg("--local-user", fingerprint, "--detach-sign", "--output", str(sig), str(body),
             what="signing the provenance statement")
        signature = sig.read_bytes()
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": fingerprint, "sig": base64.b64encode(signature).decode()}]}


@contextlib.contextmanager
def _keyring(path: Path) -> Iterator[Path]:
    """`path` as gpgv reads it: an armored export is dearmored into a temporary file."""
    if not path.is_file():
        raise BakeError(f"{path}: no such keyring")
    if not path.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="bake-keyring-") as d:
        out = Path(d) / "keyring.gpg"
        _gpg("--dearmor", "--output", str(out), str(path), what=f"reading the keyring {path}")
        yield out


def _gpgv(keyring: Path, *files: Path) -> str | None:
    """None when gpgv finds a good signature by a key of `keyring`, else what it said."""
    sh.require("gpgv")
    r = sh.run(["gpgv", "--keyring", str(keyring), *map(str, files)], check=False, quiet=True)
    if r.returncode == 0:
        return None
    said = [ln for ln in r.output.splitlines() if "gpgv:" in ln]
    return " ".join(said[-2:]) or f"gpgv exited {r.returncode}"


# --- provenance ----------------------------------------------------------------------------

def subjects(build: Build) -> list[dict[str, Any]]:
    """The kernel, ramdisk, image and bundle manifests, by path in the build and sha256."""
    paths = [build.dir / build.data["outputs"][role]["path"] for role in ("kernel", "ramdisk", "image")]
    bundle: dict[str, Any] = build.data["bundle"] if isinstance(build.data.get("bundle"), dict) else {}
    paths += [build.dir / entry["manifest"] for entry in bundle.values() if isinstance(entry, dict)
              and entry.get("manifest")]
    return [{"name": p.relative_to(build.dir).as_posix(), "digest": {"sha256": sha256_file(p)}} for p in paths]


def statement(build: Build) -> dict[str, Any]:
    """The in-toto statement with SLSA v1 provenance of `build` (see the module)."""
    data = build.data
    inputs: dict[str, Any] = data["inputs"] if isinstance(data.get("inputs"), dict) else {}
    recipe = dict(data.get("recipe") or {})
    deps: list[dict[str, Any]] = []
    if inputs.get("recipe"):
        recipe["sha256"] = inputs["recipe"]["sha256"]
        deps.append({"name": "recipe", "uri": f"file://{inputs['recipe']['path']}",
                     "digest": {"sha256": inputs["recipe"]["sha256"]}})
    for f in inputs.get("files") or ():
        digest = {"sha256": f["sha256"]} if f.get("sha256") else {}
        entry: dict[str, Any] = {"name": f"file {f['dest']}", "uri": f"file://{f['source']}", "digest": digest}
        if f.get("tree_sha256"):
            entry["annotations"] = {"tree_sha256": f["tree_sha256"]}
        deps.append(entry)
    base: dict[str, Any] | None = data["base"] if isinstance(data.get("base"), dict) else None
    if base and base.get("sha256"):
        deps.append({"name": "base image", "uri": str(base.get("source") or base.get("emi") or ""),
                     "digest": {"sha256": base["sha256"]}})
    distro = str(data.get("release") or "/").partition("/")[0]
    deps += [{"name": p["name"], "uri": purl(distro, p)} for p in data.get("packages") or () if isinstance(p, dict)]
    verify: dict[str, Any] = data["verify"] if isinstance(data.get("verify"), dict) else {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects(build),
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"recipe": recipe, "release": data.get("release"), "arch": data.get("arch"),
                                       "elements": data.get("elements") or [], "mirror": data.get("mirror")},
                "internalParameters": {"stages_run": data.get("stages_run") or []},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"bake": str(inputs.get("bake") or "unknown"),
                                                          **(inputs.get("host_tools") or {})}},
                "metadata": {"invocationId": f"{build.dir.parent.name}/{build.id}", "startedOn": data.get("created"),
                             "finishedOn": data.get("finished")},
                "byproducts": [{"name": "verification", "annotations": {
                    "result": verify.get("result"), "mode": verify.get("mode"), "checks": verify.get("checks")}}],
            },
        },
    }


# --- signing a release ---------------------------------------------------------------------

def sign_release(build: Build, sums: Path, fingerprint: str) -> dict[str, str]:
    """SHA256SUMS.gpg and provenance.intoto.jsonl in the build; what the record says."""
    detach_sign(sums, fingerprint)
    envelope = dsse_envelope(statement(build), fingerprint)
    tmp = build.dir / (PROVENANCE + ".tmp")
    tmp.write_text(json.dumps(envelope, sort_keys=True) + "\n")
    os.replace(tmp, build.dir / PROVENANCE)
    return {"key": fingerprint, "sha256sums_signature": SUMS_SIGNATURE, "provenance": PROVENANCE}


# --- checking a release --------------------------------------------------------------------

def _check_sums(d: Path, keyring: Path, problems: list[str], ok: list[str]) -> None:
    sums, sig = d / "SHA256SUMS", d / SUMS_SIGNATURE
    if not sums.is_file():
        problems.append("no SHA256SUMS: not a released build")
        return
    if not sig.is_file():
        problems.append(f"no {SUMS_SIGNATURE}: the release is not signed")
    else:
        bad = _gpgv(keyring, sig, sums)
        (problems.append(f"{SUMS_SIGNATURE}: bad or unknown signature ({bad})") if bad
         else ok.append(f"{SUMS_SIGNATURE} signs SHA256SUMS"))
    wrong = []
    lines = [ln for ln in sums.read_text().splitlines() if ln.strip()]
    for line in lines:
        digest, _, name = line.partition("  ")
        path = d / name
        if not path.is_file():
            wrong.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            wrong.append(f"{name} does not match its sha256")
    problems.extend(f"SHA256SUMS: {w}" for w in wrong)
    if not wrong:
        ok.append(f"SHA256SUMS: {len(lines)} files match")


def _check_provenance(d: Path, keyring: Path, problems: list[str], ok: list[str]) -> None:
    path = d / PROVENANCE
    if not path.is_file():
        problems.append(f"no {PROVENANCE}: the release has no provenance statement")
        return
    try:
        envelope = json.loads(path.read_text().splitlines()[0])
        payload = base64.b64decode(envelope["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in envelope["signatures"]]
        ptype = envelope["payloadType"]
        st = json.loads(payload)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        problems.append(f"{PROVENANCE}: not a DSSE envelope of a JSON statement ({type(e).__name__}: {e})")
        return
    if ptype != PAYLOAD_TYPE:
        problems.append(f"{PROVENANCE}: payload type {ptype!r}, not {PAYLOAD_TYPE}")
    with tempfile.TemporaryDirectory(prefix="bake-dsse-") as tmp:
        body = Path(tmp) / "pae"
        body.write_bytes(pae(str(ptype), payload))
        said = []
        for i, sig in enumerate(sigs):
            (Path(tmp) / f"sig{i}").write_bytes(sig)
            said.append(_gpgv(keyring, Path(tmp) / f"sig{i}", body))
    if not sigs or all(s is not None for s in said):
        problems.append(f"{PROVENANCE}: no good signature by a key of the keyring ({'; '.join(map(str, said))})")
    else:
        ok.append(f"{PROVENANCE}: DSSE signature good")
    if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != SLSA_PROVENANCE:
        problems.append(f"{PROVENANCE}: not an in-toto v1 statement of SLSA v1 provenance")
    wrong = []
    for s in st.get("subject") or ():
        path = d / str(s.get("name"))
        want = (s.get("digest") or {}).get("sha256")
        if not path.is_file():
            wrong.append(f"subject {s.get('name')} is missing")
        elif sha256_file(path) != want:
            wrong.append(f"subject {s.get('name')} does not match its sha256")
    problems.extend(f"{PROVENANCE}: {w}" for w in wrong)
    if not st.get("subject"):
        problems.append(f"{PROVENANCE}: the statement names no subject")
    elif not wrong:
        ok.append(f"{PROVENANCE}: {len(st['subject'])} subjects match")


def _check_streams(d: Path, keyring: Path, problems: list[str], ok: list[str]) -> None:
    root = d.parent.parent
    index = root / STREAMS / "index.sjson"
    if not index.is_file():
        return
    bad = _gpgv(keyring, index)
    if bad:
        problems.append(f"{index}: bad or unknown signature ({bad})")
        return
    ok.append(f"{index.relative_to(root)} signed")
    text = index.read_text()
    body = text.split("\n\n", 1)[1].split("\n-----BEGIN PGP SIGNATURE-----", 1)[0] if "\n\n" in text else ""
    try:
        entries = json.loads(body).get("index", {}).values()
    except ValueError:
        problems.append(f"{index}: its signed body is not JSON")
        return
    for entry in entries:
        product = root / str(entry.get("path"))
        if not product.is_file():
            problems.append(f"{index}: names {entry.get('path')}, which is missing")
            continue
        bad = _gpgv(keyring, product)
        (problems.append(f"{product}: bad or unknown signature ({bad})") if bad
         else ok.append(f"{product.relative_to(root)} signed"))


def verify_release(build_dir: Path, keyring: Path) -> tuple[list[str], list[str]]:
    """Check a signed release against `keyring`: (what holds, what does not)."""
    d = Path(build_dir)
    problems: list[str] = []
    ok: list[str] = []
    with _keyring(Path(keyring)) as ring:
        _check_sums(d, ring, problems, ok)
        _check_provenance(d, ring, problems, ok)
        _check_streams(d, ring, problems, ok)
    return ok, problems
