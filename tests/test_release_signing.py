"""Signed and attested releases: `bake release --sign KEY` with a key the test makes in
a GnuPG home of its own, checked with GnuPG's and simplestreams' own tools (`gpg
--verify`, `gpgv`, `sstream-query --keyring`) and by reading the DSSE envelope and its
in-toto statement directly; `bake release verify` passes the release, and fails on a
tampered file, a tampered statement and another key. Small fake builds (a trio of random
bytes, bundled by the project's bundler); nothing is baked, booted or published."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder.bundle.build import bundle_build
from builder.bundle.keys import BundleKeys
from builder.cli.main import main as bake_main
from builder.core.record import Build
from builder.operations.attest import PAYLOAD_TYPE, pae
from builder.pipeline.inputs import record_inputs
from builder.recipe.recipe import load_recipe
from test_gc import make_build

SSTREAM_QUERY = str(Path(sys.executable).parent / "sstream-query")
CHECKS = ["boots", "metadata", "acpiphp", "volume-hotplug", "hygiene", "sync-agent"]


def gpg(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", *args], capture_output=True,
                          check=True, **kw)


def make_key(home: Path, uid: str) -> tuple[str, Path]:
    """A signing key without passphrase in GnuPG home `home`; (fingerprint, its public key
    exported in binary, as gpgv and sstream-query read a keyring)."""
    home.mkdir(mode=0o700, parents=True)
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    out = gpg(home, "--with-colons", "--list-secret-keys", uid, text=True).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    public = home.parent / f"{home.name}-public.gpg"
    public.write_bytes(gpg(home, "--export", fpr).stdout)
    return fpr, public


@pytest.fixture
def signer(tmp_path, monkeypatch, clean_env):
    """GNUPGHOME with a signing key (the key of the releases), a second home with another
    key (a stranger's); the test's own cache and state."""
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))
    fpr, public = make_key(tmp_path / "gnupg", "bake releases <releases@example.invalid>")
    _, stranger = make_key(tmp_path / "stranger", "someone else <other@example.invalid>")
    monkeypatch.setenv("GNUPGHOME", str(tmp_path / "gnupg"))
    return fpr, public, stranger


def released_build(tmp_path: Path, capsys, *extra: str) -> tuple[Build, int, str]:
    """A verified, bundled build with recorded inputs (a recipe that copies a file) and
    image ids, released with `extra` options."""
    folder = tmp_path / "recipe"
    folder.mkdir()
    (folder / "motd").write_text("signed\n")
    recipe_path = folder / "signed.yml"
    recipe_path.write_text(yaml.safe_dump({"name": "signed", "release": "debian/bookworm",
                                           "files": [{"source": "motd", "dest": "/etc/motd"}]}))
    b = make_build(tmp_path / "output", "signed", "20261207-110000")
    b.data["inputs"] = record_inputs(load_recipe(recipe_path))
    b.data["release"] = "debian/bookworm"
    b.data["packages"] = [{"name": "less", "version": "590-2.1~deb12u2", "arch": "amd64", "source": "less"}]
    b.data["verify"] = {"result": "passed", "mode": "local", "checks": dict.fromkeys(CHECKS, "pass"),
                        "required": CHECKS}
    # published earlier (the ids as publishing records them), with no bucket to mark
    b.data["cloud"] = {"ec2_url": "http://127.0.0.1:9/services/compute", "image_id": "emi-0a1b2c3d",
                       "kernel_id": "eki-0a1b2c3e", "ramdisk_id": "eri-0a1b2c3f"}
    b.save()
    keys_dir = tmp_path / "bundle-keys"
    keys_dir.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=t",
                    "-keyout", str(keys_dir / "pk.pem"), "-out", str(keys_dir / "cert.pem")],
                   check=True, capture_output=True)
    bundle_build(b, BundleKeys(user_id="123456789012", cert=keys_dir / "cert.pem", private_key=keys_dir / "pk.pem",
                               cloud_cert=keys_dir / "cert.pem"), part_size=64 * 1024)
    capsys.readouterr()
    status = bake_main(["release", str(b.dir), *extra])
    out, err = capsys.readouterr()
    return Build.load(b.dir), status, out + err


def release_verify(capsys, b: Build, keyring: Path) -> tuple[int, str]:
    capsys.readouterr()
    status = bake_main(["release", "verify", str(b.dir), "--keyring", str(keyring)])
    out, err = capsys.readouterr()
    return status, out + err


def statement_of(b: Build) -> tuple[dict, dict]:
    envelope = json.loads((b.dir / "provenance.intoto.jsonl").read_text().splitlines()[0])
    return envelope, json.loads(base64.b64decode(envelope["payload"]))


def test_a_signed_release_passes_gpg_sstream_query_and_its_own_check(tmp_path, capsys, signer):
    fpr, public, _ = signer
    b, status, out = released_build(tmp_path, capsys, "--sign", fpr)
    assert status == 0, out
    assert b.data["released"]["signed"] == {"key": fpr, "sha256sums_signature": "SHA256SUMS.gpg",
                                            "provenance": "provenance.intoto.jsonl"}
    # GnuPG's own check of SHA256SUMS, and sha256sum's of the files
    r = subprocess.run(["gpgv", "--keyring", str(public), "SHA256SUMS.gpg", "SHA256SUMS"], cwd=b.dir,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=b.dir, capture_output=True).returncode == 0

    # the statement, read here: the trio and the manifests by sha256, the inputs by digest
    envelope, st = statement_of(b)
    assert envelope["payloadType"] == PAYLOAD_TYPE and envelope["signatures"][0]["keyid"] == fpr
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    for role in ("kernel", "ramdisk", "image"):
        path = b.data["outputs"][role]["path"]
        assert subjects[path] == hashlib.sha256((b.dir / path).read_bytes()).hexdigest() == \
            b.data["outputs"][role]["sha256"]
    manifests = [e["manifest"] for e in b.data["bundle"].values()]
    assert len(manifests) == 3 and all(m in subjects for m in manifests)
    deps = {d["name"]: d for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
    recipe_file = tmp_path / "recipe" / "signed.yml"
    assert deps["recipe"]["digest"]["sha256"] == hashlib.sha256(recipe_file.read_bytes()).hexdigest()
    assert deps["file /etc/motd"]["digest"]["sha256"] == hashlib.sha256(b"signed\n").hexdigest()
    assert deps["less"]["uri"] == "pkg:deb/debian/less@590-2.1~deb12u2?arch=amd64"
    builder = st["predicate"]["runDetails"]["builder"]
    assert builder["version"]["bake"] and "dpkg" in builder["version"]
    # the DSSE signature is over DSSE's pre-authentication encoding of the payload
    pae_file, sig_file = tmp_path / "pae", tmp_path / "sig"
    pae_file.write_bytes(pae(PAYLOAD_TYPE, base64.b64decode(envelope["payload"])))
    sig_file.write_bytes(base64.b64decode(envelope["signatures"][0]["sig"]))
    r = subprocess.run(["gpgv", "--keyring", str(public), str(sig_file), str(pae_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    # simplestreams' own client, on the signed index: it names the EMI
    index = tmp_path / "output" / "streams" / "v1" / "index.sjson"
    r = subprocess.run([SSTREAM_QUERY, "--keyring", str(public), "--json", str(index), "itype=machine"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [i["id"] for i in json.loads(r.stdout)] == ["emi-0a1b2c3d"]

    status, out = release_verify(capsys, b, public)
    assert status == 0, out
    assert "FAIL" not in out and "ok\tSHA256SUMS.gpg signs SHA256SUMS" in out
    assert "ok\tprovenance.intoto.jsonl: 6 subjects match" in out
    assert "streams/v1/index.sjson signed" in out


def test_an_armored_public_key_is_a_keyring_too(tmp_path, capsys, signer):
    fpr, _, _ = signer
    b, status, out = released_build(tmp_path, capsys, "--sign", fpr)
    assert status == 0, out
    armored = tmp_path / "public.asc"
    armored.write_bytes(gpg(tmp_path / "gnupg", "--armor", "--export", fpr).stdout)
    status, out = release_verify(capsys, b, armored)
    assert status == 0, out


def test_a_tampered_file_statement_or_signature_fails_the_check(tmp_path, capsys, signer):
    fpr, public, stranger = signer
    b, status, out = released_build(tmp_path, capsys, "--sign", fpr)
    assert status == 0, out

    # another key's keyring: every signature is unknown
    status, out = release_verify(capsys, b, stranger)
    assert status == 1
    assert "FAIL\tSHA256SUMS.gpg: bad or unknown signature" in out
    assert "FAIL\tprovenance.intoto.jsonl: no good signature" in out

    # a changed ramdisk: SHA256SUMS and the statement both say so
    ramdisk = b.dir / b.data["outputs"]["ramdisk"]["path"]
    original = ramdisk.read_bytes()
    ramdisk.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    status, out = release_verify(capsys, b, public)
    assert status == 1
    assert f"FAIL\tSHA256SUMS: {ramdisk.name} does not match its sha256" in out
    assert f"FAIL\tprovenance.intoto.jsonl: subject {ramdisk.name} does not match its sha256" in out
    ramdisk.write_bytes(original)
    assert release_verify(capsys, b, public)[0] == 0

    # a statement edited to vouch for other bytes: its signature no longer holds
    path = b.dir / "provenance.intoto.jsonl"
    saved = path.read_text()
    envelope, st = statement_of(b)
    st["subject"][0]["digest"]["sha256"] = "0" * 64
    envelope["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    path.write_text(json.dumps(envelope) + "\n")
    status, out = release_verify(capsys, b, public)
    assert status == 1 and "FAIL\tprovenance.intoto.jsonl: no good signature" in out
    path.write_text(saved)

    # an edited SHA256SUMS (a line dropped): its signature no longer holds
    sums = b.dir / "SHA256SUMS"
    sums.write_text("".join(sums.read_text().splitlines(keepends=True)[1:]))
    status, out = release_verify(capsys, b, public)
    assert status == 1 and "FAIL\tSHA256SUMS.gpg: bad or unknown signature" in out


def test_an_unsigned_release_has_no_signature_and_its_check_says_so(tmp_path, capsys, signer):
    _, public, _ = signer
    b, status, out = released_build(tmp_path, capsys)
    assert status == 0, out
    assert "signed" not in b.data["released"]
    assert not (b.dir / "SHA256SUMS.gpg").exists() and not (b.dir / "provenance.intoto.jsonl").exists()
    assert not (tmp_path / "output" / "streams" / "v1" / "index.sjson").exists()
    status, out = release_verify(capsys, b, public)
    assert status == 1
    assert "FAIL\tno SHA256SUMS.gpg: the release is not signed" in out
    assert "FAIL\tno provenance.intoto.jsonl" in out


def test_a_key_that_is_not_there_is_refused_before_anything_is_written(tmp_path, capsys, signer):
    b, status, out = released_build(tmp_path, capsys, "--sign", "nobody@example.invalid")
    assert status == 1
    assert "no secret key that can sign matches 'nobody@example.invalid'" in out and os.environ["GNUPGHOME"] in out
    assert "released" not in b.data and not (b.dir / "SHA256SUMS").exists()


def test_a_bake_records_its_inputs_a_copied_folder_by_a_digest_of_its_tree(tmp_path):
    folder = tmp_path / "recipe"
    (folder / "conf.d").mkdir(parents=True)
    (folder / "conf.d" / "a.conf").write_text("a\n")
    (folder / "motd").write_text("hello\n")
    recipe_path = folder / "r.yml"
    recipe_path.write_text(yaml.safe_dump({"name": "r", "release": "debian/bookworm",
                                           "files": [{"source": "motd", "dest": "/etc/motd"},
                                                     {"source": "conf.d", "dest": "/etc/app/conf.d"}]}))
    first = record_inputs(load_recipe(recipe_path))
    assert first["recipe"] == {"path": str(recipe_path), "sha256": hashlib.sha256(recipe_path.read_bytes()).hexdigest()}
    motd, conf = first["files"]
    assert motd == {"source": str(folder / "motd"), "dest": "/etc/motd",
                    "sha256": hashlib.sha256(b"hello\n").hexdigest()}
    assert conf["dest"] == "/etc/app/conf.d" and len(conf["tree_sha256"]) == 64
    (folder / "conf.d" / "a.conf").chmod(0o600)             # a mode is part of what is copied
    assert record_inputs(load_recipe(recipe_path))["files"][1]["tree_sha256"] != conf["tree_sha256"]
