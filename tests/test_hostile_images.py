"""A base image or a bundle is hostile until checked: each test here is a real attack,
judged from outside. A disk image that points at a file of the build box (a backing
file, an external data file, a vmdk extent), a tarball whose members would land
outside their folder or are devices or claim a terabyte, a bundle that inflates past
its manifest: each is refused with one line naming the file and what it points at,
the host's files are as they were, nothing of the host file is in bake's output
folder, and no process bake started is left.

The bases are opened as the bootstrap stage of a `base:` recipe opens them
(`formats.identify`, then `formats.unpack`) and bundles by `unbundle`, what downloading
an EMI calls; the one test that runs `bake build` on such a base is marked `bakes`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from base_fixtures import OS_RELEASE, fs_image
from bundle_forge import forge_bundle
from bundle_keys import make_credentials
from builder.base import formats
from builder.base.diskinfo import NOT_FOLLOWED
from builder.bundle.reader import unbundle
from builder.core import lifetime
from builder.core.errors import BakeError
from builder.core.limits import ENV as CAP_ENV
from builder.core.record import Build
from conftest import BAKE

MiB = 1 << 20
MARKER = b"host-secret-" + secrets.token_hex(8).encode()   # in the host file, never in bake's output


# --- what is judged ----------------------------------------------------------------------

def children() -> set[int]:
    """The processes whose parent is this one (a qemu-img or appliance left behind), but
    the watchdog of this process's session, which lives as long as the process."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found - {lifetime.session().watchdog.pid}


def state(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


def files_with_marker(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and MARKER in p.read_bytes()]


def refused_base(tmp_path: Path, image: Path, *, watched: tuple[Path, ...] = ()) -> str:
    """Open `image` as a base the way the bootstrap stage does (`open_base`: identify it,
    then unpack its filesystem into the build's work folder; the appliance's inspection
    that follows is left out, so a base that got through fails here at once); the
    one-line error, after checking that the files in `watched` did not change, no
    process was left and no file under the output folder holds the marker."""
    before = {p: state(p) for p in watched}
    build = Build.create(tmp_path / "output", "hostile")
    with pytest.raises(BakeError) as refused:
        formats.unpack(formats.identify(image), build.dir / "work" / "base", partition="auto")
    message = str(refused.value)
    assert "\n" not in message
    assert {p: state(p) for p in watched} == before
    assert children() == set()
    assert files_with_marker(tmp_path / "output") == []
    return message


# --- inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host_fs(tmp_path_factory) -> Path:
    """A file of the build box that would make a fine base: an ext4 filesystem of a
    Debian tree holding the marker (in plain blocks, where a copy of it would show)."""
    folder = tmp_path_factory.mktemp("host")
    tree = folder / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_bytes(OS_RELEASE)
    for program in ("bin/sh", "sbin/init"):
        (tree / program).parent.mkdir(exist_ok=True)
        (tree / program).write_bytes(b"\x7fELF")
        (tree / program).chmod(0o755)
    (tree / "root").mkdir()
    (tree / "root" / "secret").write_bytes(MARKER * 64)
    image = fs_image(tree, folder / "host.img", size=32 * MiB)
    assert MARKER in image.read_bytes()
    return image


@pytest.fixture
def host_file(host_fs, tmp_path) -> Path:
    copy = tmp_path / "host-file.img"
    shutil.copyfile(host_fs, copy)
    return copy


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, timeout=60)


# --- disk images that point at host files ------------------------------------------------

def test_a_qcow2_whose_backing_file_is_a_host_file_is_refused_and_none_of_it_is_baked(host_file, tmp_path):
    overlay = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", host_file, "-F", "raw", overlay)
    message = refused_base(tmp_path, overlay, watched=(host_file, overlay))
    assert message.startswith(f"{overlay}: ")
    assert f"backing file is '{host_file}'" in message and NOT_FOLLOWED in message


def test_a_qcow2_whose_data_lives_in_a_host_file_is_refused(host_fs, tmp_path):
    data_file, image = tmp_path / "host-data.img", tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file},data_file_raw=on", image,
             str(os.path.getsize(host_fs)))
    shutil.copyfile(host_fs, data_file)     # the data file, written after qemu-img made it, is a host filesystem
    message = refused_base(tmp_path, image, watched=(data_file, image))
    assert message.startswith(f"{image}: ")
    assert f"external data file '{data_file}'" in message and NOT_FOLLOWED in message


def test_a_vmdk_descriptor_whose_extent_is_a_host_file_is_refused(host_file, tmp_path):
    sectors = os.path.getsize(host_file) // 512
    vmdk = tmp_path / "base.vmdk"
    vmdk.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    f'createType="monolithicFlat"\nRW {sectors} FLAT "{host_file}" 0\n')
    message = refused_base(tmp_path, vmdk, watched=(host_file,))
    assert message.startswith(f"{vmdk}: a vmdk descriptor") and NOT_FOLLOWED in message


def test_a_qcow2_header_qemu_cannot_read_is_refused_as_a_format_bake_cannot_tell(tmp_path):
    odd = tmp_path / "base.img"
    odd.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(MiB - 8))
    message = refused_base(tmp_path, odd)
    assert message == f"{odd}: its first bytes are a qcow2 header, but qemu-img cannot read it; " \
                      "bake cannot tell what it holds"


# --- tarballs ----------------------------------------------------------------------------

def uec_tarball_with(dest: Path, image: Path, hostile: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A UEC tarball that would open (a filesystem image and a kernel) with `hostile` in it."""
    out = dest / "hostile-uec.tar.gz"
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(image, arcname="hostile-uec.img")
        tar.addfile(hostile, io.BytesIO(data) if hostile.isreg() else None)
        kernel = tarfile.TarInfo("hostile-uec-vmlinuz-virtual")
        kernel.size = 4
        tar.addfile(kernel, io.BytesIO(b"kern"))
    return out


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname, m.size = kind, link, size
    return m


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "device", "fifo", "link-out"])
def test_a_uec_tarball_with_a_member_that_would_leave_its_folder_or_is_a_device_is_refused(kind, host_fs,
                                                                                           tmp_path):
    outside = tmp_path / f"outside-{secrets.token_hex(4)}"
    hostile = {"dotdot": member(f"../../../{outside.name}", size=6),
               "absolute": member(str(outside), size=6),
               "device": member("dev/sda-of-the-host", tarfile.BLKTYPE),
               "fifo": member("run/fifo", tarfile.FIFOTYPE),
               "link-out": member("etc-of-the-host", tarfile.SYMTYPE, link="../../../../etc")}[kind]
    tarball = uec_tarball_with(tmp_path, host_fs, hostile, b"owned\n")
    message = refused_base(tmp_path, tarball, watched=(tarball,))
    assert message.startswith(f"{tarball}: member {hostile.name!r} refused: ")
    assert not outside.exists()
    made = [p for p in tmp_path.rglob("*") if not (p.is_file() or p.is_dir()) or p.is_symlink()]
    assert made == []


def test_a_tar_member_declaring_more_than_the_cap_is_refused_at_its_header(tmp_path, monkeypatch):
    # a cap of 16 MiB and a member of 1 GiB: a reader that skipped over the member
    # rather than refusing it would still end within seconds, and fail
    monkeypatch.setenv(CAP_ENV, "16M")
    tarball = tmp_path / "huge.tar"
    with open(tarball, "wb") as f:
        f.write(member("huge-uec.img", size=1 << 30).tobuf(tarfile.GNU_FORMAT))
        f.write(bytes(20 * 512))
    message = refused_base(tmp_path, tarball)
    assert message.startswith(f"{tarball}: member 'huge-uec.img' declares 1073741824 bytes, more than 16777216 ")
    assert f"set {CAP_ENV}" in message


def test_a_tarball_inflating_past_the_cap_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv(CAP_ENV, "4M")
    tarball = tmp_path / "bomb-uec.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.addfile(member("bomb-uec.img", size=64 * MiB), io.BytesIO(bytes(64 * MiB)))
    assert os.path.getsize(tarball) < MiB
    message = refused_base(tmp_path, tarball)
    assert "declares 67108864 bytes, more than 4194304 bytes" in message and f"set {CAP_ENV}" in message
    assert all(p.stat().st_size <= 4 * MiB for p in (tmp_path / "output").rglob("*") if p.is_file())


# --- bundles -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("keys"))


def tar_of(*members: tuple[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(member(name, size=len(data)), io.BytesIO(data))
    return out.getvalue()


def refused_bundle(creds, tmp_path: Path, stream: bytes, size: int) -> str:
    manifest = forge_bundle(stream, tmp_path / "bundle", name="disk.img", size=size, user_cert=creds.user.cert,
                            user_key=creds.user.key, cloud_cert=creds.cloud.cert, part_size=64 * 1024)
    dest = tmp_path / "out"
    with pytest.raises(BakeError) as refused:
        unbundle(manifest, private_key=creds.user.key, source_dir=None, destination=dest)
    assert not dest.exists() or list(dest.iterdir()) == []
    assert children() == set()
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_a_bundle_whose_image_declares_more_than_its_manifest_is_refused_before_writing(creds, tmp_path):
    # a <size> above the reader's first helping (1 MiB), so that the header is judged before the stream
    message = refused_bundle(creds, tmp_path, tar_of(("disk.img", bytes(8 * MiB))), size=2 * MiB)
    assert "declares 8388608 bytes but the manifest's <size> says 2097152: refused before writing" in message


def test_a_bundle_whose_stream_inflates_past_its_manifest_is_refused_as_it_is_read(creds, tmp_path):
    stream = tar_of(("disk.img", os.urandom(4096)), ("padding", bytes(16 * MiB)))
    assert len(gzip.compress(stream)) < MiB
    message = refused_bundle(creds, tmp_path, stream, size=4096)
    assert "inflates to more than" in message and "refused as it was read" in message


def test_a_bundle_over_the_cap_is_refused_before_any_part_is_read(creds, tmp_path, monkeypatch):
    monkeypatch.setenv(CAP_ENV, "1M")
    message = refused_bundle(creds, tmp_path, tar_of(("disk.img", bytes(2 * MiB))), size=2 * MiB)
    assert "declares an image of 2097152 bytes, more than 1048576 bytes" in message and f"set {CAP_ENV}" in message


# --- the whole command -------------------------------------------------------------------

@pytest.mark.bakes
def test_bake_build_refuses_a_backing_file_base_in_its_first_stage(host_file, tmp_path):
    overlay = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", host_file, "-F", "raw", overlay)
    recipe = tmp_path / "hostile.yml"
    recipe.write_text(yaml.safe_dump({"name": "hostile", "release": "debian/bookworm",
                                      "base": {"image": str(overlay)}}))
    before = state(host_file)
    env = {**os.environ, "BAKE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([BAKE, "build", str(recipe), "--stop-after", "bootstrap", "--output", str(tmp_path / "out")],
                       check=False, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"backing file is '{host_file}'" in r.stderr and NOT_FOLLOWED in r.stderr
    assert state(host_file) == before
    assert files_with_marker(tmp_path / "out") == [] and files_with_marker(tmp_path / "cache") == []
