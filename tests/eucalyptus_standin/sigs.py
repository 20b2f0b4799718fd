"""Request signatures as Eucalyptus checks them, written from the AWS specifications
(not from botocore, so that a client bug cannot hide behind the same code on both sides).

- EC2 query API: Signature Version 2 (HmacSHA1/HmacSHA256) and Signature Version 4.
- Walrus/object storage: HmacV1 ("AWS key:signature") with Walrus' canonical resource:
  the request path as received, and on mismatch that path stripped of the service
  prefix; never with a trailing slash added. SigV4 only where the mode allows it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence
from urllib.parse import quote, unquote


class AuthError(Exception):
    """A request the cloud refuses to authenticate; `code` is the error code it answers."""

    def __init__(self, code: str, message: str, status: int = 403):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class SignedRequest:
    """What a verifier needs of an HTTP request, as received on the wire."""

    method: str
    path: str                       # raw (percent-encoded) path, no query
    query: str                      # raw query string
    headers: Mapping[str, str]      # case-insensitive lookups via .get on lowercased names
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _enc(s: str) -> str:
    return quote(s, safe="-_.~")


def _query_pairs(raw: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw.split("&") if raw else []:
        if not item:
            continue
        k, _, v = item.partition("=")
        pairs.append((unquote(k.replace("+", "%20")), unquote(v.replace("+", "%20"))))
    return pairs


def _secret_for(access_key: str, keys: Mapping[str, str], code: str) -> str:
    if access_key not in keys:
        raise AuthError(code, f"The access key {access_key!r} does not exist in our records.")
    return keys[access_key]


# --- EC2: Signature Version 2 ------------------------------------------------------------

def verify_sigv2(req: SignedRequest, params: Mapping[str, str], keys: Mapping[str, str]) -> str:
    """Check a SigV2-signed query request; return its access key or raise AuthError."""
    access = params.get("AWSAccessKeyId", "")
    secret = _secret_for(access, keys, "AuthFailure")
    if params.get("SignatureVersion") != "2":
        raise AuthError("AuthFailure", f"unsupported SignatureVersion {params.get('SignatureVersion')!r}")
    method = params.get("SignatureMethod", "")
    digest = {"HmacSHA256": hashlib.sha256, "HmacSHA1": hashlib.sha1}.get(method)
    if digest is None:
        raise AuthError("AuthFailure", f"unsupported SignatureMethod {method!r}")
    if "Timestamp" not in params and "Expires" not in params:
        raise AuthError("MissingParameter", "Timestamp or Expires is required", 400)
    canonical = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in sorted(params.items()) if k != "Signature")
    host = (req.header("host") or "").lower()
    to_sign = f"{req.method}\n{host}\n{req.path or '/'}\n{canonical}"
    expected = base64.b64encode(hmac.new(secret.encode(), to_sign.encode(), digest).digest()).decode()
    if not hmac.compare_digest(expected, params.get("Signature", "")):
        raise AuthError("AuthFailure", "Failure to authenticate: signature (v2) does not match")
    return access


# --- S3: HmacV1 with Walrus' canonical resource -------------------------------------------

S3_SUBRESOURCES = frozenset("""acl cors delete lifecycle location logging notification partNumber policy
requestPayment restore tagging torrent uploadId uploads versionId versioning versions website
response-cache-control response-content-disposition response-content-encoding
response-content-language response-content-type response-expires""".split())

_V1_AUTH = re.compile(r"^AWS ([^:\s]+):(\S+)$")


def _v1_string_to_sign(req: SignedRequest, resource_path: str) -> str:
    amz: dict[str, list[str]] = {}
    for name, value in req.headers.items():
        if name.startswith("x-amz-"):
            amz.setdefault(name, []).append(" ".join(value.split()))
    date = "" if "x-amz-date" in amz else (req.header("date") or "")
    amz_lines = "".join(f"{k}:{','.join(v)}\n" for k, v in sorted(amz.items()))
    subs = sorted((k, v) for k, v in _query_pairs(req.query) if k in S3_SUBRESOURCES)
    resource = resource_path
    if subs:
        resource += "?" + "&".join(k if v == "" else f"{k}={v}" for k, v in subs)
    return (f"{req.method}\n{req.header('content-md5') or ''}\n{req.header('content-type') or ''}\n"
            f"{date}\n{amz_lines}{resource}")


def verify_hmacv1(req: SignedRequest, service_prefix: str, keys: Mapping[str, str]) -> str:
    """Check an HmacV1 ("AWS key:sig") request as Walrus does: canonical resource = the
    full request path, then the path without `service_prefix`. Returns the access key."""
    m = _V1_AUTH.match(req.header("authorization") or "")
    if not m:
        raise AuthError("AccessDenied", "malformed Authorization header")
    access, signature = m.groups()
    secret = _secret_for(access, keys, "InvalidAccessKeyId")
    candidates = [req.path]
    if req.path.startswith(service_prefix):
        candidates.append(req.path[len(service_prefix):] or "/")
    for path in candidates:
        to_sign = _v1_string_to_sign(req, path)
        expected = base64.b64encode(hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()).decode()
        if hmac.compare_digest(expected, signature):
            return access
    raise AuthError("SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided "
                    f"(canonical resource tried: {' then '.join(candidates)})")


# --- Signature Version 4 (EC2 and, where allowed, S3) ------------------------------------

_V4_AUTH = re.compile(r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-f]+)$")


def _hmac256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def verify_sigv4(req: SignedRequest, keys: Mapping[str, str], *, s3: bool) -> str:
    """Check a SigV4 Authorization header. Like Eucalyptus, the credential scope's region
    and service are not checked against anything. Returns the access key."""
    m = _V4_AUTH.match(req.header("authorization") or "")
    if not m:
        raise AuthError("AuthFailure" if not s3 else "AccessDenied", "malformed AWS4-HMAC-SHA256 Authorization header")
    credential, signed_headers, signature = m.groups()
    try:
        access, date, region, service, terminator = credential.split("/")
    except ValueError:
        raise AuthError("AuthFailure", "malformed credential scope") from None
    if terminator != "aws4_request":
        raise AuthError("AuthFailure", "credential scope must end in aws4_request")
    secret = _secret_for(access, keys, "InvalidAccessKeyId" if s3 else "AuthFailure")
    amz_date = req.header("x-amz-date")
    if not amz_date:
        raise AuthError("AuthFailure", "x-amz-date header is required for SigV4")
    names = signed_headers.split(";")
    if "host" not in names:
        raise AuthError("AuthFailure", "the host header must be signed")
    canonical_headers = ""
    for name in names:
        value = req.header(name)
        if value is None:
            raise AuthError("AuthFailure", f"signed header {name!r} is missing")
        canonical_headers += f"{name}:{' '.join(value.split())}\n"
    if s3:
        payload_hash = req.header("x-amz-content-sha256") or ""
        if payload_hash.startswith("STREAMING-"):
            raise AuthError("NotImplemented", "chunked SigV4 uploads are not supported", 501)
        if payload_hash != "UNSIGNED-PAYLOAD" and payload_hash != hashlib.sha256(req.body).hexdigest():
            raise AuthError("XAmzContentSHA256Mismatch", "x-amz-content-sha256 does not match the body", 400)
        uri = req.path or "/"
    else:
        payload_hash = hashlib.sha256(req.body).hexdigest()
        uri = quote(req.path or "/", safe="/~")
    query = "&".join(f"{_enc(k)}={_enc(v)}" for k, v in sorted(_query_pairs(req.query)))
    canonical_request = "\n".join([req.method, uri, query, canonical_headers, signed_headers, payload_hash])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _hmac256(_hmac256(_hmac256(_hmac256(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise AuthError("SignatureDoesNotMatch" if s3 else "AuthFailure",
                        "Failure to authenticate: signature (v4) does not match")
    return access


MAX_SKEW = 15 * 60   # seconds; Eucalyptus, like AWS, refuses requests further off than this


def check_time(req: SignedRequest, params: Mapping[str, str] | None = None, *, now: float | None = None) -> None:
    """Refuse a request whose signed time (x-amz-date, Date, or the SigV2 Timestamp /
    Expires parameter) is more than MAX_SKEW from now."""
    now = time.time() if now is None else now
    params = params or {}
    when = None
    try:
        if req.header("x-amz-date"):
            v = req.header("x-amz-date") or ""
            when = (_dt.datetime.strptime(v, "%Y%m%dT%H%M%SZ").replace(tzinfo=_dt.timezone.utc).timestamp()
                    if "T" in v and "-" not in v else email.utils.parsedate_to_datetime(v).timestamp())
        elif params.get("Expires"):
            if _iso(params["Expires"]) < now:
                raise AuthError("RequestExpired", f"Request has expired (Expires {params['Expires']})")
            return
        elif params.get("Timestamp"):
            when = _iso(params["Timestamp"])
        elif req.header("date"):
            when = email.utils.parsedate_to_datetime(req.header("date") or "").timestamp()
    except (ValueError, TypeError):
        raise AuthError("AuthFailure", "the request's date cannot be read", 400) from None
    if when is not None and abs(now - when) > MAX_SKEW:
        raise AuthError("RequestTimeTooSkewed" if not params else "RequestExpired",
                        "The difference between the request time and the current time is too large.")


def _iso(v: str) -> float:
    v = v.replace("Z", "+00:00")
    d = _dt.datetime.fromisoformat(v)
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def is_sigv4(req: SignedRequest) -> bool:
    return (req.header("authorization") or "").startswith("AWS4-HMAC-SHA256")


def query_params(req: SignedRequest, form_body: bool) -> dict[str, str]:
    """The EC2 query parameters of a request: its query string and, for a form POST, its body."""
    params = dict(_query_pairs(req.query))
    if form_body:
        params.update(_query_pairs(req.body.decode("utf-8", "replace")))
    return params


def names_matching(params: Iterable[str], allowed: Sequence[re.Pattern]) -> list[str]:
    """The parameter names that no pattern in `allowed` matches."""
    return [p for p in params if not any(a.fullmatch(p) for a in allowed)]
