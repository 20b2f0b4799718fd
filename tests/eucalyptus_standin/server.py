"""The stand-in's HTTP front: Eucalyptus' service paths, signature checks, strict
parameter binding, its own image registry (emi-/eki-/eri-) and delayed state changes,
in front of moto's EC2 and S3 backends (called in-process through moto's WSGI app)."""

from __future__ import annotations

import base64
import datetime as _dt
import re
import secrets
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode

from werkzeug.test import Client

from . import sigs
from .keys import TestIdentity
from .manifest_check import ManifestRefused, check_manifest

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

# moto's backends are process-global; one lock keeps the fronts of several stand-ins
# (3.x and 4.x may run at once) from interleaving calls into them.
_MOTO_LOCK = threading.Lock()
_MOTO_CLIENT: Client | None = None


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
}
_KNOWN = {a: [re.compile(p) for p in COMMON + ps] for a, ps in KNOWN_PARAMS.items()}
_DEVICE = re.compile(r"^[a-zA-Z\d/]{3,10}$")


class Ec2Error(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


# --- records kept by the front ----------------------------------------------------------

@dataclass
class Image:
    id: str
    type: str
    location: str
    name: str
    owner: str
    architecture: str
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    description: str = ""
    state: str = "available"


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


class Front:
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
        self.instances: dict[str, dict] = {}      # id -> {"launched": t, "terminated": t|None, "kernel":…}
        self.volumes: dict[str, dict] = {}        # id -> {"created": t, "attached": t|None, "detached": t|None}
        self.console_output: dict[str, str] = {}
        self.default_console = ("Linux version 2.6.32 (stand-in)\nFreeing unused kernel memory\n"
                                "Ubuntu login: \n")
        self.requests: list[RequestRecord] = []
        self.put_faults: list[PutFault] = []
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
        except sigs.AuthError as e:
            self._log(RequestRecord("s3", req.method, sub, op, e.status, headers=_headers(req), query=req.query))
            return e.status, [("Content-Type", "application/xml")], _s3_error(e.code, e.message, sub)
        fwd = {k: v for k, v in req.headers.items()
               if k not in ("authorization", "host", "expect", "content-length", "connection")}
        status, hdrs, out = self._moto_call(req.method, sub, req.query, fwd, req.body, "s3")
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
            if sigs.is_sigv4(req):
                sigs.verify_sigv4(req, self.keys, s3=False)
            elif "Signature" in params:
                sigs.verify_sigv2(req, params, self.keys)
            else:
                raise sigs.AuthError("MissingAuthenticationToken", "request is not signed")
            if action in _KNOWN:
                unknown = sigs.names_matching(params, _KNOWN[action])
                if unknown:
                    raise Ec2Error("InvalidParameter", "Failed to bind the following fields: " + ", ".join(sorted(unknown)))
            handler = getattr(self, f"_ec2_{action}", None)
            clean = {k: v for k, v in params.items() if k not in COMMON or k in ("Action", "Version")}
            if handler is not None:
                status, out = handler(clean)
            else:
                status, out = self._ec2_forward(clean)
        except (sigs.AuthError, Ec2Error) as e:
            self._log(RequestRecord("ec2", req.method, "/", action, e.status, _visible(params)))
            return e.status, [("Content-Type", "text/xml")], _ec2_error(e.code, e.message)
        self._log(RequestRecord("ec2", req.method, "/", action, status, _visible(params)))
        return status, [("Content-Type", "text/xml;charset=UTF-8")], out

    def _ec2_forward(self, params: dict) -> tuple[int, bytes]:
        status, _, out = self._moto_call("POST", "/", "", {"Content-Type": "application/x-www-form-urlencoded"},
                                         urlencode(params).encode(), "ec2")
        return status, out

    # images: kept by the front, since Eucalyptus' ids and manifest checks are its own

    def _new_id(self, prefix: str) -> str:
        h = secrets.token_hex(4)
        return f"{prefix}-{h.upper() if self.version == '3' else h}"

    def _ec2_RegisterImage(self, p: dict) -> tuple[int, bytes]:
        location = p.get("ImageLocation")
        if not location:
            raise Ec2Error("MissingParameter", "ImageLocation is required (only bundled images can be registered)")
        if "RootDeviceName" in p:
            raise Ec2Error("InvalidParameterCombination", "RootDeviceName is not allowed with ImageLocation")
        bucket, _, key = location.lstrip("/").partition("/")
        raw = self.s3_get(bucket, key) if key else None
        if raw is None:
            raise Ec2Error("InvalidManifest", f"Failed to read manifest file {location}: not found")
        try:
            m = check_manifest(raw, self.identity.user_cert_obj, self.identity.cloud_key_obj)
        except ManifestRefused as e:
            raise Ec2Error("InvalidManifest", f"{location}: {e}") from None
        if m.user != self.identity.account_id:
            raise Ec2Error("InvalidManifest", f"Manifest is not accessible: {location} belongs to account {m.user}")
        arch = p.get("Architecture") or m.architecture or "i386"
        if arch not in ("i386", "x86_64"):
            raise Ec2Error("InvalidParameterValue", f"unsupported architecture {arch}")
        kernel = p.get("KernelId") or m.kernel_id
        ramdisk = p.get("RamdiskId") or m.ramdisk_id
        if m.image_type == "machine":
            if self.version == "4" and not kernel:
                raise Ec2Error("MissingParameter", "Kernel ID must be specified")
            if self.version == "4" and not ramdisk:
                raise Ec2Error("MissingParameter", "Ramdisk ID must be specified")
            for ref, kind in ((kernel, "kernel"), (ramdisk, "ramdisk")):
                if ref and (ref not in self.images or self.images[ref].type != kind):
                    raise Ec2Error("InvalidParameterValue", f"{ref} is not a registered {kind} image")
        else:
            kernel = ramdisk = None
        name = p.get("Name") or m.name
        image = Image(self._new_id({"machine": "emi", "kernel": "eki", "ramdisk": "eri"}[m.image_type]),
                      m.image_type, location, name, self.identity.account_id, arch, kernel, ramdisk,
                      p.get("Description", ""))
        with self._lock:
            self.images[image.id] = image
        return 200, _ec2_xml("RegisterImageResponse", f"<imageId>{image.id}</imageId>")

    def _ec2_DeregisterImage(self, p: dict) -> tuple[int, bytes]:
        with self._lock:
            if self.images.pop(p.get("ImageId", ""), None) is None:
                raise Ec2Error("InvalidAMIID.NotFound", f"The image id '[{p.get('ImageId')}]' does not exist")
        return 200, _ec2_xml("DeregisterImageResponse", "<return>true</return>")

    def _ec2_DescribeImages(self, p: dict) -> tuple[int, bytes]:
        ids = [v for k, v in p.items() if k.startswith("ImageId.")]
        filters = _filters(p)
        with self._lock:
            images = list(self.images.values())
        missing = [i for i in ids if i not in {im.id for im in images}]
        if missing:
            raise Ec2Error("InvalidAMIID.NotFound", f"The image id '[{', '.join(missing)}]' does not exist")
        fields = {"image-id": "id", "image-type": "type", "manifest-location": "location", "kernel-id": "kernel_id",
                  "ramdisk-id": "ramdisk_id", "name": "name", "architecture": "architecture", "state": "state",
                  "owner-id": "owner"}
        out = []
        for im in images:
            if ids and im.id not in ids:
                continue
            if any(getattr(im, fields[n]) not in vs if n in fields else n != "root-device-type" or
                   "instance-store" not in vs for n, vs in filters.items()):
                continue
            out.append(
                f"<item><imageId>{im.id}</imageId><imageLocation>{_x(im.location)}</imageLocation>"
                f"<imageState>{im.state}</imageState><imageOwnerId>{im.owner}</imageOwnerId>"
                f"<isPublic>false</isPublic><architecture>{im.architecture}</architecture>"
                f"<imageType>{im.type}</imageType>"
                + (f"<kernelId>{im.kernel_id}</kernelId>" if im.kernel_id else "")
                + (f"<ramdiskId>{im.ramdisk_id}</ramdiskId>" if im.ramdisk_id else "")
                + f"<name>{_x(im.name)}</name><description>{_x(im.description)}</description>"
                f"<rootDeviceType>instance-store</rootDeviceType><rootDeviceName>/dev/sda1</rootDeviceName>"
                f"<blockDeviceMapping/><virtualizationType>paravirtual</virtualizationType>"
                f"<hypervisor>kvm</hypervisor></item>")
        return 200, _ec2_xml("DescribeImagesResponse", f"<imagesSet>{''.join(out)}</imagesSet>")

    # instances

    def _ec2_RunInstances(self, p: dict) -> tuple[int, bytes]:
        image = self.images.get(p.get("ImageId", ""))
        if image is None or image.type != "machine":
            raise Ec2Error("InvalidAMIID.NotFound", f"The image id '[{p.get('ImageId')}]' does not exist")
        kernel = p.get("KernelId") or image.kernel_id
        ramdisk = p.get("RamdiskId") or image.ramdisk_id
        for ref, kind in ((kernel, "kernel"), (ramdisk, "ramdisk")):
            if ref and (ref not in self.images or self.images[ref].type != kind):
                raise Ec2Error("InvalidParameterValue", f"{ref} is not a registered {kind} image")
        if self.version == "4" and not (kernel and ramdisk):
            raise Ec2Error("InvalidParameterValue", "a paravirtual image needs a kernel and a ramdisk")
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        now = time.monotonic()
        for item in _items(root, "instancesSet"):
            iid = _text(item, "instanceId")
            with self._lock:
                self.instances[iid] = {"launched": now, "terminated": None, "kernel": kernel, "ramdisk": ramdisk}
            self._rewrite_instance(item)
        return 200, _dump(root)

    def _rewrite_instance(self, item: ET.Element) -> None:
        rec = self.instances.get(_text(item, "instanceId"))
        if rec is None:
            return
        now = time.monotonic()
        if rec["terminated"] is not None:
            code, name = (32, "shutting-down") if now - rec["terminated"] < self.state_delay else (48, "terminated")
        elif now - rec["launched"] < self.state_delay:
            code, name = 0, "pending"
        else:
            code, name = 16, "running"
        for st in item:
            if st.tag.endswith("instanceState"):
                for child in st:
                    if child.tag.endswith("code"):
                        child.text = str(code)
                    elif child.tag.endswith("name"):
                        child.text = name
        ns = item.tag[:item.tag.index("}") + 1] if item.tag.startswith("{") else ""
        for tag, value in (("kernelId", rec["kernel"]), ("ramdiskId", rec["ramdisk"])):
            el = item.find(ns + tag)
            if value:
                (el if el is not None else ET.SubElement(item, ns + tag)).text = value
            elif el is not None:
                item.remove(el)

    def _instance_state(self, iid: str) -> str:
        rec = self.instances.get(iid)
        if rec is None:
            return "unknown"
        now = time.monotonic()
        if rec["terminated"] is not None:
            return "shutting-down" if now - rec["terminated"] < self.state_delay else "terminated"
        return "pending" if now - rec["launched"] < self.state_delay else "running"

    def _ec2_DescribeInstances(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        for res in _items(root, "reservationSet"):
            for item in _items(res, "instancesSet"):
                self._rewrite_instance(item)
        return 200, _dump(root)

    def _ec2_TerminateInstances(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status == 200:
            now = time.monotonic()
            with self._lock:
                for k, v in p.items():
                    if k.startswith("InstanceId.") and v in self.instances and self.instances[v]["terminated"] is None:
                        self.instances[v]["terminated"] = now
        return status, out

    def _ec2_GetConsoleOutput(self, p: dict) -> tuple[int, bytes]:
        iid = p.get("InstanceId", "")
        if iid not in self.instances:
            raise Ec2Error("InvalidInstanceID.NotFound", f"The instance ID '{iid}' does not exist")
        text = "" if self._instance_state(iid) == "pending" else self.console_output.get(iid, self.default_console)
        ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return 200, _ec2_xml("GetConsoleOutputResponse",
                             f"<instanceId>{iid}</instanceId><timestamp>{ts}</timestamp>"
                             f"<output>{base64.b64encode(text.encode()).decode()}</output>")

    # volumes

    def _volume_state(self, vid: str) -> tuple[str, str | None]:
        """(volume status, attachment status or None) as the delays make them now."""
        rec = self.volumes.get(vid)
        if rec is None:
            return "available", None
        now = time.monotonic()
        if now - rec["created"] < self.state_delay:
            return "creating", None
        if rec["attached"] is not None:
            return "in-use", "attaching" if now - rec["attached"] < self.state_delay else "attached"
        if rec["detached"] is not None and now - rec["detached"] < self.state_delay:
            return "in-use", "detaching"
        return "available", None

    def _ec2_CreateVolume(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        vid = _text(root, "volumeId")
        with self._lock:
            self.volumes[vid] = {"created": time.monotonic(), "attached": None, "detached": None}
        for child in root:
            if child.tag.endswith("}status"):
                child.text = "creating"
        return 200, _dump(root)

    def _ec2_AttachVolume(self, p: dict) -> tuple[int, bytes]:
        device = p.get("Device", "")
        if not _DEVICE.match(device) or (self.version == "3" and device.endswith(("sda", "sdb"))):
            raise Ec2Error("InvalidParameterValue", f"Invalid device name: {device}")
        vid, iid = p.get("VolumeId", ""), p.get("InstanceId", "")
        if vid in self.volumes and self._volume_state(vid)[0] != "available":
            raise Ec2Error("IncorrectState", f"Volume {vid} is not available")
        if iid in self.instances and self._instance_state(iid) != "running":
            raise Ec2Error("IncorrectState", f"Instance {iid} is not running")
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        with self._lock:
            if vid in self.volumes:
                self.volumes[vid].update(attached=time.monotonic(), detached=None)
        root = ET.fromstring(out)
        for child in root:
            if child.tag.endswith("}status"):
                child.text = "attaching"
        return 200, _dump(root)

    def _ec2_DetachVolume(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        with self._lock:
            vid = p.get("VolumeId", "")
            if vid in self.volumes:
                self.volumes[vid].update(attached=None, detached=time.monotonic())
        root = ET.fromstring(out)
        for child in root:
            if child.tag.endswith("}status"):
                child.text = "detaching"
        return 200, _dump(root)

    def _ec2_DescribeVolumes(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        for item in _items(root, "volumeSet"):
            vol_status, att_status = self._volume_state(_text(item, "volumeId"))
            for child in item:
                if child.tag.endswith("}status"):
                    child.text = vol_status
                elif child.tag.endswith("}attachmentSet"):
                    for att in list(child):
                        if att_status is None:
                            child.remove(att)
                        else:
                            for a in att:
                                if a.tag.endswith("}status"):
                                    a.text = att_status
        return 200, _dump(root)

    def _ec2_DeleteVolume(self, p: dict) -> tuple[int, bytes]:
        vid = p.get("VolumeId", "")
        if vid in self.volumes and self._volume_state(vid)[0] != "available":
            raise Ec2Error("VolumeInUse", f"Volume {vid} is {self._volume_state(vid)[0]}")
        status, out = self._ec2_forward(p)
        if status == 200:
            with self._lock:
                self.volumes.pop(vid, None)
        return status, out


# --- helpers ------------------------------------------------------------------------------

def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _x(s: str | None) -> str:
    return (s or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _headers(req: sigs.SignedRequest) -> dict:
    return {k: v for k, v in req.headers.items() if k != "authorization"}


def _visible(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("Signature", "AWSAccessKeyId")}


def _ec2_xml(root: str, inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{EC2_NS}">'
            f"<requestId>{uuid.uuid4()}</requestId>{inner}</{root}>").encode()


def _ec2_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{_x(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


def _s3_error(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{_x(message)}</Message>'
            f"<Resource>{_x(resource)}</Resource><RequestId>{uuid.uuid4()}</RequestId></Error>").encode()


def _filters(p: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k, v in p.items():
        m = re.fullmatch(r"Filter\.(\d+)\.Name", k)
        if m:
            n = m.group(1)
            out.setdefault(v, set()).update(val for kk, val in p.items() if kk.startswith(f"Filter.{n}.Value."))
    return out


def _items(root: ET.Element, set_name: str) -> list[ET.Element]:
    found = []
    for el in root.iter():
        if el.tag.endswith("}" + set_name) or el.tag == set_name:
            found.extend(c for c in el if c.tag.endswith("item"))
            break
    return found


def _text(el: ET.Element, name: str) -> str:
    for c in el.iter():
        if c.tag.endswith("}" + name) or c.tag == name:
            return c.text or ""
    return ""


def _dump(root: ET.Element) -> bytes:
    if root.tag.startswith("{"):
        ET.register_namespace("", root.tag[1:root.tag.index("}")])
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root)
