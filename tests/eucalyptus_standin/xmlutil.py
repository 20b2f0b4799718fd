"""XML in and out of the stand-in: EC2 and S3 replies and errors, and edits of moto's
EC2 replies whatever their namespace."""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


class Ec2Error(Exception):
    """An EC2 error reply: code, message, HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


# --- records kept by the front ----------------------------------------------------------


def esc(s: str | None) -> str:
    return (s or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def ec2_reply(root: str, inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{EC2_NS}">'
            f"<requestId>{uuid.uuid4()}</requestId>{inner}</{root}>").encode()


def ec2_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{esc(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


def s3_error(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{esc(message)}</Message>'
            f"<Resource>{esc(resource)}</Resource><RequestId>{uuid.uuid4()}</RequestId></Error>").encode()


def filters(p: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k, v in p.items():
        m = re.fullmatch(r"Filter\.(\d+)\.Name", k)
        if m:
            n = m.group(1)
            out.setdefault(v, set()).update(val for kk, val in p.items() if kk.startswith(f"Filter.{n}.Value."))
    return out


def split_filters(p: dict, local: set[str]) -> tuple[dict, dict[str, set[str]]]:
    """(the parameters with the filters named in `local` taken out and the rest renumbered,
    those filters) — for filters on state the front decides, not moto."""
    fs = filters(p)
    rest = {k: v for k, v in p.items() if not k.startswith("Filter.")}
    n = 0
    for name, values in fs.items():
        if name in local:
            continue
        n += 1
        rest[f"Filter.{n}.Name"] = name
        for i, v in enumerate(sorted(values), 1):
            rest[f"Filter.{n}.Value.{i}"] = v
    return rest, {k: v for k, v in fs.items() if k in local}


def items(root: ET.Element, set_name: str) -> list[ET.Element]:
    found = []
    for el in root.iter():
        if el.tag.endswith("}" + set_name) or el.tag == set_name:
            found.extend(c for c in el if c.tag.endswith("item"))
            break
    return found


def text(el: ET.Element, name: str) -> str:
    for c in el.iter():
        if c.tag.endswith("}" + name) or c.tag == name:
            return c.text or ""
    return ""


def dump(root: ET.Element) -> bytes:
    if root.tag.startswith("{"):
        ET.register_namespace("", root.tag[1:root.tag.index("}")])
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
