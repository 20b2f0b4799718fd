"""The stand-in's instances and volumes: moto keeps them, the front makes their states
change after a delay (pending → running, creating → available, attaching → attached,
shutting-down → terminated) and refuses what Eucalyptus refuses (bad device names,
attaching to an instance that is not running). Terminating an instance detaches its
volumes, as on Eucalyptus (and in moto). DescribeInstances knows the `client-token`
filter, which moto lacks."""

from __future__ import annotations

import base64
import datetime as _dt
import re
import threading
import time
import xml.etree.ElementTree as ET

from . import xmlutil as X

_DEVICE = re.compile(r"^[a-zA-Z\d/]{3,10}$")


class ComputeMixin:
    """RunInstances … DeleteVolume (mixed into the Front)."""

    version: str
    state_delay: float
    images: dict
    instances: dict[str, dict]
    volumes: dict[str, dict]
    console_output: dict[str, str]
    default_console: str
    hidden_describes: int
    stuck_volumes: set[str]
    _lock: threading.RLock

    def _ec2_forward(self, params: dict) -> tuple[int, bytes]:
        raise NotImplementedError

    def _ec2_RunInstances(self, p: dict) -> tuple[int, bytes]:
        image = self.images.get(p.get("ImageId", ""))
        if image is None or image.type != "machine":
            raise X.Ec2Error("InvalidAMIID.NotFound", f"The image id '[{p.get('ImageId')}]' does not exist")
        kernel = p.get("KernelId") or image.kernel_id
        ramdisk = p.get("RamdiskId") or image.ramdisk_id
        for ref, kind in ((kernel, "kernel"), (ramdisk, "ramdisk")):
            if ref and (ref not in self.images or self.images[ref].type != kind):
                raise X.Ec2Error("InvalidParameterValue", f"{ref} is not a registered {kind} image")
        if self.version == "4" and not (kernel and ramdisk):
            raise X.Ec2Error("InvalidParameterValue", "a paravirtual image needs a kernel and a ramdisk")
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        now = time.monotonic()
        for item in X.items(root, "instancesSet"):
            iid = X.text(item, "instanceId")
            with self._lock:
                self.instances[iid] = {"launched": now, "terminated": None, "kernel": kernel, "ramdisk": ramdisk}
            self._rewrite_instance(item)
        return 200, X.dump(root)

    def _rewrite_instance(self, item: ET.Element) -> None:
        rec = self.instances.get(X.text(item, "instanceId"))
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
        with self._lock:
            if self.hidden_describes > 0:
                self.hidden_describes -= 1
                return 200, X.ec2_reply("DescribeInstancesResponse", "<reservationSet/>")
        p, local = X.split_filters(p, {"instance-state-name", "instance-state-code", "client-token"})
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        for res_set in root:
            if not res_set.tag.endswith("reservationSet"):
                continue
            for res in list(res_set):
                for inst_set in res:
                    if not inst_set.tag.endswith("instancesSet"):
                        continue
                    for item in list(inst_set):
                        self._rewrite_instance(item)
                        state = self._instance_state(X.text(item, "instanceId"))
                        code = {"pending": "0", "running": "16", "shutting-down": "32", "terminated": "48"}.get(state)
                        names, codes = local.get("instance-state-name"), local.get("instance-state-code")
                        tokens = local.get("client-token")
                        if (names and state not in names) or (codes and code not in codes) or \
                                (tokens and X.text(item, "clientToken") not in tokens):
                            inst_set.remove(item)
                    if not len(inst_set):
                        res_set.remove(res)
        return 200, X.dump(root)

    def _ec2_TerminateInstances(self, p: dict) -> tuple[int, bytes]:
        status, out = self._ec2_forward(p)
        if status == 200:
            now = time.monotonic()
            with self._lock:
                ended = {v for k, v in p.items() if k.startswith("InstanceId.")
                         and v in self.instances and self.instances[v]["terminated"] is None}
                for iid in ended:
                    self.instances[iid]["terminated"] = now
                for rec in self.volumes.values():
                    if rec["attached"] is not None and rec.get("instance") in ended:
                        rec.update(attached=None, detached=now)
        return status, out

    def _ec2_GetConsoleOutput(self, p: dict) -> tuple[int, bytes]:
        iid = p.get("InstanceId", "")
        if iid not in self.instances:
            raise X.Ec2Error("InvalidInstanceID.NotFound", f"The instance ID '{iid}' does not exist")
        text = "" if self._instance_state(iid) == "pending" else self.console_output.get(iid, self.default_console)
        ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return 200, X.ec2_reply("GetConsoleOutputResponse",
                             f"<instanceId>{iid}</instanceId><timestamp>{ts}</timestamp>"
                             f"<output>{base64.b64encode(text.encode()).decode()}</output>")

    def _volume_state(self, vid: str) -> tuple[str, str | None]:
        """(volume status, attachment status or None) as the delays make them now."""
        rec = self.volumes.get(vid)
        if rec is None:
            return "available", None
        if vid in self.stuck_volumes:
            return "in-use", "attached"
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
        vid = X.text(root, "volumeId")
        with self._lock:
            self.volumes[vid] = {"created": time.monotonic(), "attached": None, "detached": None, "instance": None}
        for child in root:
            if child.tag.endswith("}status"):
                child.text = "creating"
        return 200, X.dump(root)

    def _ec2_AttachVolume(self, p: dict) -> tuple[int, bytes]:
        device = p.get("Device", "")
        if not _DEVICE.match(device) or (self.version == "3" and device.endswith(("sda", "sdb"))):
            raise X.Ec2Error("InvalidParameterValue", f"Invalid device name: {device}")
        vid, iid = p.get("VolumeId", ""), p.get("InstanceId", "")
        if vid in self.volumes and self._volume_state(vid)[0] != "available":
            raise X.Ec2Error("IncorrectState", f"Volume {vid} is not available")
        if iid in self.instances and self._instance_state(iid) != "running":
            raise X.Ec2Error("IncorrectState", f"Instance {iid} is not running")
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        with self._lock:
            if vid in self.volumes:
                self.volumes[vid].update(attached=time.monotonic(), detached=None, instance=iid)
        root = ET.fromstring(out)
        for child in root:
            if child.tag.endswith("}status"):
                child.text = "attaching"
        return 200, X.dump(root)

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
        return 200, X.dump(root)

    def _ec2_DescribeVolumes(self, p: dict) -> tuple[int, bytes]:
        p, local = X.split_filters(p, {"status", "attachment.status"})
        status, out = self._ec2_forward(p)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        for vol_set in root:
            if not vol_set.tag.endswith("volumeSet"):
                continue
            for item in list(vol_set):
                vol_status, att_status = self._volume_state(X.text(item, "volumeId"))
                if vol_status not in local.get("status", {vol_status}) or \
                        ("attachment.status" in local and att_status not in local["attachment.status"]):
                    vol_set.remove(item)
        for item in X.items(root, "volumeSet"):
            vol_status, att_status = self._volume_state(X.text(item, "volumeId"))
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
        return 200, X.dump(root)

    def _ec2_DeleteVolume(self, p: dict) -> tuple[int, bytes]:
        vid = p.get("VolumeId", "")
        if vid in self.volumes and self._volume_state(vid)[0] != "available":
            raise X.Ec2Error("VolumeInUse", f"Volume {vid} is {self._volume_state(vid)[0]}")
        status, out = self._ec2_forward(p)
        if status == 200:
            with self._lock:
                self.volumes.pop(vid, None)
        return status, out
