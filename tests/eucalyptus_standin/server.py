"""The stand-in's HTTP front: Eucalyptus' service paths, signature checks, strict
parameter binding, its own image registry (emi-/eki-/eri-) and delayed state changes,
in front of moto's EC2 and S3 backends (called in-process through moto's WSGI app)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode

from werkzeug.test import Client

from . import sigs
from . import xmlutil as X
from .ec2_compute import ComputeMixin
from .ec2_images import Image, ImagesMixin
from .keys import TestIdentity

# moto's backends are process-global; one lock keeps the fronts of several stand-ins
# (3.x and 4.x may run at once) from interleaving calls into them.
_MOTO_LOCK = threading.Lock()
_MOTO_CLIENT: Client | None = None
# Bucket names are one namespace for the whole cloud (and for every stand-in in this
# process); moto does not keep accounts apart within it, so the fronts do: bucket → account.
_BUCKET_OWNERS: dict[str, str] = {}


def _moto() -> Client:
    global _MOTO_CLIENT
    if _MOTO_CLIENT is None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        _MOTO_CLIENT = Client(DomainDispatcherApplication(create_backend_app))
    return _MOTO_CLIENT


def _fake_v4(service: str) -> str:
    # moto routes on the credential scope of an Authorization header and checks nothing else.
    return f"AWS4-HMAC-SHA256 Credential=MOTO/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"


# --- EC2 query binding: which parameters each action knows ------------------------------

COMMON = ["Action", "Version", "AWSAccessKeyId", "SignatureVersion", "SignatureMethod", "Signature",
          "Timestamp", "Expires", "SecurityToken"]
FILTER = [r"Filter\.\d+\.Name", r"Filter\.\d+\.Value\.\d+"]
BDM = [r"BlockDeviceMapping\.\d+\.(DeviceName|VirtualName|NoDevice|Ebs\.SnapshotId|Ebs\.VolumeSize|"
       r"Ebs\.DeleteOnTermination|Ebs\.VolumeType|Ebs\.Iops)"]
KNOWN_PARAMS: dict[str, list[str]] = {
    "RegisterImage": ["ImageLocation", "Name", "Description", "Architecture", "KernelId", "RamdiskId",
                      "RootDeviceName", "VirtualizationType", "Platform", *BDM],
    "DescribeImages": [r"ImageId\.\d+", r"Owner\.\d+", r"ExecutableBy\.\d+", *FILTER],
    "DeregisterImage": ["ImageId"],
    "RunInstances": ["ImageId", "MinCount", "MaxCount", "KeyName", r"SecurityGroup\.\d+", r"SecurityGroupId\.\d+",
                     "UserData", "InstanceType", r"Placement\.(AvailabilityZone|GroupName|Tenancy)", "KernelId",
                     "RamdiskId", "Monitoring.Enabled", "SubnetId", "DisableApiTermination",
                     "InstanceInitiatedShutdownBehavior", "PrivateIpAddress", "ClientToken", "AddressingType",
                     r"IamInstanceProfile\.(Arn|Name)", "EbsOptimized", *BDM],
    "DescribeInstances": [r"InstanceId\.\d+", *FILTER],
    "TerminateInstances": [r"InstanceId\.\d+"],
    "GetConsoleOutput": ["InstanceId"],
    "CreateVolume": ["Size", "SnapshotId", "AvailabilityZone", "VolumeType", "Iops"],
    "AttachVolume": ["VolumeId", "InstanceId", "Device"],
    "DetachVolume": ["VolumeId", "InstanceId", "Device", "Force"],
    "DescribeVolumes": [r"VolumeId\.\d+", *FILTER],
    "DeleteVolume": ["VolumeId"],
    "DescribeAvailabilityZones": [r"ZoneName\.\d+", *FILTER],
    "CreateKeyPair": ["KeyName"],
    "DeleteKeyPair": ["KeyName"],
    "DescribeKeyPairs": [r"KeyName\.\d+", *FILTER],
    "CreateSecurityGroup": ["GroupName", "GroupDescription"],
    "DeleteSecurityGroup": ["GroupName", "GroupId"],
    "DescribeSecurityGroups": [r"GroupName\.\d+", r"GroupId\.\d+", *FILTER],
    "AuthorizeSecurityGroupIngress": ["GroupName", "GroupId", "IpProtocol", "FromPort", "ToPort", "CidrIp",
                                      r"IpPermissions\.\d+\..+"],
    "CreateTags": [r"ResourceId\.\d+", r"Tag\.\d+\.(Key|Value)"],
    "DeleteTags": [r"ResourceId\.\d+", r"Tag\.\d+\.(Key|Value)"],
    "DescribeTags": [*FILTER],
    "DescribeImageAttribute": ["ImageId", "Attribute"],
}
# ModifyImageAttribute: Eucalyptus 3.0-3.2 bind only the query form of EC2 API versions up
# to 2010-06-15 (Attribute, OperationType, UserId.N, UserGroup.N) and refuse
# LaunchPermission.Add.N.Group as a field they cannot bind; the newer form came with 3.3
# (EUCA-4270) and 4.x keeps both. The 3.x stand-in is strict as 3.0-3.2 are.
MODIFY_IMAGE_UP_TO_2010 = ["ImageId", "Attribute", "OperationType", r"UserId\.\d+", r"UserGroup\.\d+",
                           r"ProductCode\.\d+"]
KNOWN_PARAMS["ModifyImageAttribute"] = [*MODIFY_IMAGE_UP_TO_2010, r"Group\.\d+", "Description.Value",
                                        r"LaunchPermission\.(Add|Remove)\.\d+\.(UserId|Group)"]
KNOWN_PARAMS_3X = {"ModifyImageAttribute": MODIFY_IMAGE_UP_TO_2010}
_KNOWN = {a: [re.compile(p) for p in COMMON + ps] for a, ps in KNOWN_PARAMS.items()}
_KNOWN_3X = {**_KNOWN, **{a: [re.compile(p) for p in COMMON + ps] for a, ps in KNOWN_PARAMS_3X.items()}}


@dataclass
class RequestRecord:
    """One request the front answered, for tests to count and inspect."""

    service: str            # "ec2" or "s3"
    method: str
    path: str               # below the service prefix, e.g. /bucket/key
    operation: str          # EC2 Action, or "PUT /bucket/key" style for S3
    status: int
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)   # as received, Authorization left out
    query: str = ""


@dataclass
class PutFault:
    """Answer `status` to PUTs of object keys matching `pattern` once `after` of them
    succeeded; `times` failures at most (None: every one after that)."""

    pattern: re.Pattern
    after: int
    status: int = 503
    times: int | None = None
    succeeded: int = 0
    failed: int = 0


@dataclass
class Ec2Fault:
    """Answer EC2 `action` with error `code` (HTTP `status`) `times` times (None: always)."""

    action: str
    code: str
    message: str = "injected failure"
    status: int = 400
    times: int | None = 1
    failed: int = 0


class Front(ImagesMixin, ComputeMixin):
    """The WSGI application: one Eucalyptus cloud in 3.x or 4.x mode."""

    def __init__(self, version: str, identity: TestIdentity, *, state_delay: float = 1.0):
        if version not in ("3", "4"):
            raise ValueError("version must be '3' or '4'")
        self.version = version
        self.identity = identity
        self.state_delay = state_delay
        self.keys = {identity.access_key: identity.secret_key}
        if version == "3":
            self.ec2_paths, self.s3_paths = ("/services/Eucalyptus",), ("/services/Walrus",)
        else:  # 4.x keeps the 3.x paths as legacy aliases
            self.ec2_paths = ("/services/compute", "/services/Eucalyptus")
            self.s3_paths = ("/services/objectstorage", "/services/Walrus")
        self.images: dict[str, Image] = {}
        self.admin = True   # only administrators may register kernel and ramdisk images
        self.clock_offset = 0.0   # seconds the cloud's clock is ahead of this machine's
        self.instances: dict[str, dict] = {}      # id -> {"launched": t, "terminated": t|None, "kernel":…}
        # id -> {"created": t, "attached": t|None, "detached": t|None, "instance": the last attached to}
        self.volumes: dict[str, dict] = {}
        self.console_output: dict[str, str] = {}
        self.default_console = ("Linux version 2.6.32 (stand-in)\nFreeing unused kernel memory\n"
                                "Ubuntu login: \n")
        self.requests: list[RequestRecord] = []
        self.put_faults: list[PutFault] = []
        self.ec2_faults: list[Ec2Fault] = []
        self.hidden_describes = 0                 # DescribeInstances calls still to answer with no reservations
        self.stuck_volumes: set[str] = set()      # volumes that stay in-use whatever is asked
        self.on_request: list[Callable[[RequestRecord], None]] = []
        self._lock = threading.RLock()

    # --- WSGI ----------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/")
        path, _, query = raw_uri.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        if environ.get("CONTENT_LENGTH"):
            headers["content-length"] = environ["CONTENT_LENGTH"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        req = sigs.SignedRequest(environ["REQUEST_METHOD"], path, query, headers, body)
        for prefix in self.ec2_paths:
            if path == prefix or path == prefix + "/":
                status, hdrs, out = self._ec2(req)
                break
        else:
            for prefix in self.s3_paths:
                if path == prefix or path.startswith(prefix + "/"):
                    status, hdrs, out = self._s3(req, prefix)
                    break
            else:
                status, hdrs, out = 404, [("Content-Type", "text/plain")], b"no such service path\n"
        if not any(h[0].lower() == "content-length" for h in hdrs):
            hdrs = hdrs + [("Content-Length", str(len(out)))]
        start_response(f"{status} {_reason(status)}", hdrs)
        return [b"" if req.method == "HEAD" else out]

    def _log(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)
        for fn in list(self.on_request):
            fn(rec)

    # --- S3 / Walrus ---------------------------------------------------------------------

    def _s3(self, req: sigs.SignedRequest, prefix: str):
        sub = req.path[len(prefix):] or "/"
        op = f"{req.method} {sub}"
        try:
            sigs.check_time(req, now=time.time() + self.clock_offset)
            if sigs.is_sigv4(req):
                if self.version == "3":
                    raise sigs.AuthError("AccessDenied", "Walrus 3.x does not accept AWS4-HMAC-SHA256 signatures")
                sigs.verify_sigv4(req, self.keys, s3=True)
            else:
                sigs.verify_hmacv1(req, prefix, self.keys)
            q = dict(sigs._query_pairs(req.query))
            if self.version == "3" and ("uploads" in q or "uploadId" in q):
                raise sigs.AuthError("NotImplemented", "Walrus does not implement multipart uploads", 501)
            if req.method == "PUT" and sub.count("/") >= 2 and "partNumber" not in q:
                for fault in self.put_faults:
                    if fault.pattern.search(sub):
                        if fault.succeeded >= fault.after and (fault.times is None or fault.failed < fault.times):
                            fault.failed += 1
                            raise sigs.AuthError("ServiceUnavailable", "injected failure", fault.status)
                        fault.succeeded += 1
            bucket = sub.strip("/").split("/")[0]
            owner = _BUCKET_OWNERS.get(bucket)
            if bucket and owner is not None and owner != self.identity.account_id:
                if req.method == "PUT" and sub.strip("/") == bucket:
                    raise sigs.AuthError("BucketAlreadyExists", "The requested bucket name is not available.", 409)
                raise sigs.AuthError("AccessDenied", "Access Denied", 403)
        except sigs.AuthError as e:
            self._log(RequestRecord("s3", req.method, sub, op, e.status, headers=_headers(req), query=req.query))
            return e.status, [("Content-Type", "application/xml")], X.s3_error(e.code, e.message, sub)
        fwd = {k: v for k, v in req.headers.items()
               if k not in ("authorization", "host", "expect", "content-length", "connection")}
        status, hdrs, out = self._moto_call(req.method, sub, req.query, fwd, req.body, "s3")
        if bucket and sub.strip("/") == bucket and not req.query:
            if req.method == "PUT" and status == 200:
                _BUCKET_OWNERS.setdefault(bucket, self.identity.account_id)
            elif req.method == "DELETE" and status in (200, 204):
                _BUCKET_OWNERS.pop(bucket, None)
        self._log(RequestRecord("s3", req.method, sub, op, status, headers=_headers(req), query=req.query))
        return status, hdrs, out

    def _moto_call(self, method, path, query, headers, body, service):
        headers = dict(headers)
        headers["Host"] = "s3.amazonaws.com" if service == "s3" else "ec2.us-east-1.amazonaws.com"
        headers["Authorization"] = _fake_v4(service)
        headers["x-moto-account-id"] = self.identity.account_id
        with _MOTO_LOCK:
            r = _moto().open(path, method=method, query_string=query or None, headers=headers, data=body)
            out = r.get_data()
        keep = [(k, v) for k, v in r.headers.items()
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date")
                and not k.lower().startswith("access-control-")]
        if method == "HEAD" and "Content-Length" in r.headers:
            keep.append(("Content-Length", r.headers["Content-Length"]))
        return r.status_code, keep, out

    def s3_get(self, bucket: str, key: str) -> bytes | None:
        """An object from the store as the cloud itself reads it (no signature), or None."""
        status, _, out = self._moto_call("GET", f"/{bucket}/{key}", "", {}, b"", "s3")
        return out if status == 200 else None

    # --- EC2 -----------------------------------------------------------------------------

    def _ec2(self, req: sigs.SignedRequest):
        form = req.method == "POST" and (req.header("content-type") or "").startswith("application/x-www-form-urlencoded")
        params = sigs.query_params(req, form)
        action = params.get("Action", "")
        try:
            sigs.check_time(req, params, now=time.time() + self.clock_offset)
            if sigs.is_sigv4(req):
                sigs.verify_sigv4(req, self.keys, s3=False)
            elif "Signature" in params:
                sigs.verify_sigv2(req, params, self.keys)
            else:
                raise sigs.AuthError("MissingAuthenticationToken", "request is not signed")
            known = _KNOWN_3X if self.version == "3" else _KNOWN
            if action in known:
                unknown = sigs.names_matching(params, known[action])
                if unknown:
                    raise X.Ec2Error("InvalidParameter", "Failed to bind the following fields: " + ", ".join(sorted(unknown)))
            self._ec2_fault(action)
            handler = getattr(self, f"_ec2_{action}", None)
            clean = {k: v for k, v in params.items() if k not in COMMON or k in ("Action", "Version")}
            if handler is not None:
                status, out = handler(clean)
            else:
                status, out = self._ec2_forward(clean)
        except (sigs.AuthError, X.Ec2Error) as e:
            self._log(RequestRecord("ec2", req.method, "/", action, e.status, _visible(params)))
            return e.status, [("Content-Type", "text/xml")], X.ec2_error(e.code, e.message)
        self._log(RequestRecord("ec2", req.method, "/", action, status, _visible(params)))
        return status, [("Content-Type", "text/xml;charset=UTF-8")], out

    def _ec2_fault(self, action: str) -> None:
        with self._lock:
            for fault in self.ec2_faults:
                if fault.action == action and (fault.times is None or fault.failed < fault.times):
                    fault.failed += 1
                    raise X.Ec2Error(fault.code, fault.message, fault.status)

    def _ec2_forward(self, params: dict) -> tuple[int, bytes]:
        status, _, out = self._moto_call("POST", "/", "", {"Content-Type": "application/x-www-form-urlencoded"},
                                         urlencode(params).encode(), "ec2")
        return status, out


# --- helpers ------------------------------------------------------------------------------

def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _headers(req: sigs.SignedRequest) -> dict:
    return {k: v for k, v in req.headers.items() if k != "authorization"}


def _visible(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("Signature", "AWSAccessKeyId")}
