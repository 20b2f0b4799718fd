"""A disk image given as a base is one self-contained file of a format QEMU can prove,
or it is refused before QEMU or libguestfs reads it.

A qcow2 (or qed, vmdk, ...) may name other files: a backing file whose bytes show
through every cluster the image does not hold, an external data file holding all of
them, a vmdk descriptor whose extents are any files at all. Opened as they are, those
files of the build box would be baked into the image. So a base's own header is read
first (a qcow2's backing file and data file are refused before `qemu-img info` would
open the data file), then `qemu-img info` must report a format bake knows, no backing
file, no data file and no extent but the image itself, and the first bytes must not
claim a format other than the one QEMU reports (QEMU calls what it cannot read "raw").
Whatever hands the image on (`qemu-img convert`, libguestfs) checks again at that
moment and names the format explicitly, so QEMU never guesses it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from builder.core import sh
from builder.core.errors import BakeError

# The formats bake takes a base in; anything else qemu-img knows (luks, dmg, bochs, ...)
# is refused by name.
FORMATS = ("raw", "qcow2", "qcow", "qed", "vmdk", "vhdx", "vpc", "vdi")
# Those of them that can name a backing file: converted with the backing switched off.
WITH_BACKING = ("qcow", "qcow2", "qed", "vmdk")

# (offset, bytes, format): a header QEMU's own probe recognises.
MAGICS = ((0, b"QFI\xfb", "qcow2"), (0, b"QED\x00", "qed"), (0, b"KDMV", "vmdk"),
          (0, b"# Disk DescriptorFile", "vmdk"), (0, b"vhdxfile", "vhdx"), (0, b"conectix", "vpc"),
          (0x40, b"\x7f\x10\xda\xbe", "vdi"))

NOT_FOLLOWED = "bake does not follow backing or data files of a base"
INFO_TIMEOUT = 60


class HostileImage(BakeError):
    """A base image that points at other files, or whose format cannot be proved."""


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(65536)


def claimed_format(head: bytes) -> str | None:
    """The format the first bytes of an image claim, None for none QEMU would see."""
    for offset, magic, fmt in MAGICS:
        if head[offset:offset + len(magic)] == magic:
            if fmt == "qcow2" and len(head) >= 8 and struct.unpack(">I", head[4:8])[0] == 1:
                return "qcow"
            return fmt
    return None


def _qcow_header(path: Path, head: bytes) -> None:
    """Refuse a qcow or qcow2 whose header names a backing file or an external data file,
    reading nothing but the header (QEMU would open the data file to say more)."""
    if len(head) < 72:
        raise HostileImage(f"{path}: a qcow header cut short ({len(head)} bytes); bake cannot tell what it holds")
    version = struct.unpack(">I", head[4:8])[0]
    offset, length = struct.unpack(">QI", head[8:20])     # qcow lays these out as qcow2 does
    if offset:
        raise HostileImage(f"{path}: a {'qcow' if version == 1 else 'qcow2'} image whose backing file is "
                           f"{_name_at(path, offset, length)}; {NOT_FOLLOWED}")
    if version >= 3 and len(head) >= 104:
        incompatible = struct.unpack(">Q", head[72:80])[0]
        if incompatible & 0b100:
            raise HostileImage(f"{path}: a qcow2 image whose data lives in an external data file "
                               f"{_data_file_name(head, path)}; {NOT_FOLLOWED}")


def _name_at(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(min(length, 4096))
    return repr(raw.decode("utf-8", "replace")) if raw else "(a name bake could not read)"


def _data_file_name(head: bytes, path: Path) -> str:
    """The name in a qcow2 header's data-file extension, as far as the header shows it."""
    pos = struct.unpack(">I", head[100:104])[0]
    while pos + 8 <= len(head):
        kind, length = struct.unpack(">II", head[pos:pos + 8])
        if kind == 0:
            break
        if kind == 0x44415441:
            return repr(head[pos + 8:pos + 8 + length].decode("utf-8", "replace"))
        pos += 8 + (length + 7) // 8 * 8
    return "(its name is not in the header)"


def _info(path: Path) -> dict | None:
    r = sh.run(["qemu-img", "info", "-U", "--output=json", path], check=False, quiet=True,
               timeout=INFO_TIMEOUT, what=f"reading what {path} is with qemu-img info")
    if r.returncode != 0 or "{" not in r.output:
        return None
    try:
        info = json.loads(r.output[r.output.index("{"):])
    except ValueError:      # no JSON object (a warning ahead of it is skipped)
        return None
    return info if isinstance(info, dict) else None


def _points_elsewhere(path: Path, info: dict) -> str | None:
    """What `qemu-img info` says the image points at besides itself, None for nothing."""
    fmt = info.get("format")
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        return f"a {fmt} image whose backing file is {backing!r}"
    specific = info.get("format-specific")
    data = specific.get("data", {}) if isinstance(specific, dict) else {}
    if isinstance(data, dict) and data.get("data-file"):
        return f"a {fmt} image whose data lives in an external data file {data['data-file']!r}"
    own = os.path.realpath(path)
    for extent in data.get("extents", []) if isinstance(data, dict) else []:
        name = extent.get("filename", "") if isinstance(extent, dict) else ""
        if os.path.realpath(os.path.join(os.path.dirname(own), name)) != own:
            return f"a {fmt} image with an extent in another file, {name!r}"
    for child in info.get("children", []) or []:
        if isinstance(child, dict) and child.get("name") != "file":
            return f"a {fmt} image with a {child.get('name')!r} node besides its own file"
    return None


def probe(path: Path) -> str | None:
    """The qemu-img format of disk image `path`, proved to be one self-contained file;
    None when qemu-img cannot read it at all. A HostileImage naming the file and what it
    points at for a backing file, an external data file, an extent elsewhere, a format
    bake does not take, or first bytes that claim another format than QEMU reports."""
    path = Path(path)
    head = _head(path)
    claimed = claimed_format(head)
    if claimed in ("qcow", "qcow2"):
        _qcow_header(path, head)
    if claimed == "vmdk" and head.startswith(b"# Disk DescriptorFile"):
        raise HostileImage(f"{path}: a vmdk descriptor, whose data lives in the files its extents name; "
                           f"{NOT_FOLLOWED} (give the single-file vmdk or a converted image)")
    info = _info(path)
    if info is None:
        if claimed is not None:
            raise HostileImage(f"{path}: its first bytes are a {claimed} header, but qemu-img cannot read it; "
                               "bake cannot tell what it holds")
        return None
    fmt = info.get("format")
    elsewhere = _points_elsewhere(path, info)
    if elsewhere:
        raise HostileImage(f"{path}: {elsewhere}; {NOT_FOLLOWED}")
    if claimed is not None and claimed != fmt:
        raise HostileImage(f"{path}: qemu-img reads it as {fmt}, but its first bytes are a {claimed} header; "
                           "bake cannot tell which it is")
    if fmt not in FORMATS:
        raise HostileImage(f"{path}: a {fmt} image; bake takes a base as {', '.join(FORMATS)} only")
    return str(fmt)


def require(path: Path, fmt: str) -> None:
    """Check disk image `path` again as it is handed to QEMU or libguestfs: still the
    format `fmt` and still pointing at nothing else (a HostileImage otherwise)."""
    found = probe(path)
    if found != fmt:
        raise HostileImage(f"{path}: was {fmt} when bake looked at it, is {found or 'unreadable'} now; "
                           "the base changed under bake")


def convert_source(path: Path, fmt: str) -> list[str]:
    """The arguments naming `path` as the source of `qemu-img convert`: its format given,
    its protocol a plain file, and, for a format that can have one, no backing file
    opened whatever the header says."""
    if fmt not in WITH_BACKING:
        return ["-f", fmt, os.fspath(Path(path).resolve())]
    spec = {"driver": fmt, "file": {"driver": "file", "filename": os.fspath(Path(path).resolve())},
            "backing": None}
    return ["json:" + json.dumps(spec)]
