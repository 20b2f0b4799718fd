"""The instance metadata service a local instance sees at http://169.254.169.254/.

QEMU's user-mode network forwards every guest connection to 169.254.169.254:80 to a
fresh run of this file (`guestfwd=...-cmd:`), its stdin and stdout being the
connection: one process per request, no port and no thread on the host, nothing left
running. What it serves is a JSON file written by `write_metadata`; each request is
appended to a log beside it, which checks use as evidence.

Served like EC2/Eucalyptus: `/`, `/latest/` and dated versions; `meta-data/` index
listings (sub-folders end in `/`, with or without the slash asked for); `public-keys/`
as `0=<name>` and `public-keys/0/openssh-key`; `user-data` (404 when there is none).
A version it does not know is a 404, so cloud-init's Ec2 datasource, which asks for its
newer versions first, settles on 2009-04-04. Eucalyptus has no IMDSv2: the token
request (`PUT /latest/api/token`) gets a 404, as every method but GET and HEAD does,
which is the answer that makes a client fall back to IMDSv1 at once.

This file runs as a script under `python -I` and so uses the standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import time

VERSIONS = ("1.0", "2007-01-19", "2009-04-04", "latest")


def metadata_tree(*, instance_id: str, local_ipv4: str, hostname: str, ssh_public_key: str | None,
                  image_id: str = "emi-00000000", instance_type: str = "m1.small",
                  key_name: str = "bake-verify", kernel_id: str = "eki-00000000",
                  ramdisk_id: str = "eri-00000000") -> dict:
    """The meta-data tree of one instance (a key of None is left out, as for an instance
    run without a key pair)."""
    md: dict = {
        "ami-id": image_id,
        "ami-launch-index": "0",
        "ami-manifest-path": "bake/local.manifest.xml",
        "block-device-mapping": {"ami": "/dev/vda1", "root": "/dev/vda1", "ephemeral0": "/dev/vda2",
                                 "swap": "/dev/vda3"},
        "hostname": hostname,
        "instance-id": instance_id,
        "instance-type": instance_type,
        "kernel-id": kernel_id,
        "ramdisk-id": ramdisk_id,
        "local-hostname": hostname,
        "local-ipv4": local_ipv4,
        "public-hostname": hostname,
        "public-ipv4": local_ipv4,
        "placement": {"availability-zone": "local"},
        "reservation-id": "r-" + instance_id[2:],
        "security-groups": "default",
    }
    if ssh_public_key:
        md["public-keys"] = {"0": {"_name": key_name, "openssh-key": ssh_public_key.strip() + "\n"}}
    return md


def write_metadata(path: str | os.PathLike, meta_data: dict, user_data: str | None = None) -> None:
    """Write what the service serves (atomically: a request never sees half a file)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta-data": meta_data, "user-data": user_data}, f)
    os.replace(tmp, path)


def request_log(path: str | os.PathLike) -> list[dict]:
    """The requests served so far from the data file `path`: [{path, status, time}]."""
    log = f"{os.fspath(path)}.requests"
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def _listing(node: dict) -> str:
    out = []
    for k, v in node.items():
        if k.startswith("_"):
            continue
        out.append(k + "/" if isinstance(v, dict) else k)
    return "\n".join(out)


def resolve(data: dict, path: str) -> str | None:
    """The body served for `path`, or None for 404."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if not parts:
        return "\n".join(VERSIONS)
    if parts[0] not in VERSIONS:
        return None
    if len(parts) == 1:
        return "meta-data/" + ("\nuser-data" if data.get("user-data") is not None else "")
    if parts[1] == "user-data" and len(parts) == 2:
        return data.get("user-data")
    if parts[1] != "meta-data":
        return None
    node = data.get("meta-data", {})
    rest = parts[2:]
    if rest[:1] == ["public-keys"] and len(rest) == 1:
        keys = node.get("public-keys")
        if not keys:
            return None
        return "\n".join(f"{i}={v.get('_name', 'key')}" for i, v in keys.items())
    for p in rest:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return _listing(node) if isinstance(node, dict) else str(node)


MAX_HEADERS = 100
MAX_BODY = 1 << 20


def _read_request(rfile) -> tuple[str, str, dict[str, str]]:
    """Method, path and headers (lower-case names) of one request; a body its
    Content-Length announces is read and dropped, so that the client has sent all it
    meant to before the answer and the close. Without a Content-Length there is no body
    (nothing is read until EOF: a client waiting for the answer would never send one)."""
    request = rfile.readline(8192).decode("latin-1").strip()
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = rfile.readline(8192)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = min(max(int(headers.get("content-length", "0")), 0), MAX_BODY)
    except ValueError:
        length = 0
    while length > 0:
        chunk = rfile.read(min(length, 65536))
        if not chunk:
            break
        length -= len(chunk)
    method, path = (request.split(" ") + ["", ""])[:2]
    return method, path, headers


def serve_one(datafile: str, rfile, wfile) -> None:
    """Answer one HTTP request read from `rfile` on `wfile` (HTTP/1.0, then the
    connection is closed by the caller's exit)."""
    method, path, _headers = _read_request(rfile)
    try:
        with open(datafile) as f:
            data = json.load(f)
    except OSError:
        data = {}
    body = resolve(data, path) if method in ("GET", "HEAD") else None
    status = "200 OK" if body is not None else "404 Not Found"
    payload = (body if body is not None else "Not Found").encode()
    wfile.write(f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n".encode() + (payload if method != "HEAD" else b""))
    wfile.flush()
    with open(datafile + ".requests", "a") as log:
        log.write(json.dumps({"method": method, "path": path, "status": int(status[:3]), "time": time.time()}) + "\n")


if __name__ == "__main__":
    # stdin/stdout/stderr are the guest's TCP connection: never write anything else to them
    try:
        serve_one(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
    except Exception:
        pass
