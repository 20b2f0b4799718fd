"""The stand-in's image registry: Eucalyptus' own ids (emi-/eki-/eri-, which moto
would refuse in DescribeImages), the manifest checks RegisterImage makes,
DescribeImages with the filters the tool uses, and launch permissions
(ModifyImageAttribute, DescribeImageAttribute)."""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass, field

from . import xmlutil as X
from .manifest_check import ManifestRefused, check_manifest


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
    public: bool = False                                    # launch permission for the group "all"
    launch_users: set[str] = field(default_factory=set)     # accounts granted launch permission


class ImagesMixin:
    """RegisterImage, DeregisterImage, DescribeImages, ModifyImageAttribute and
    DescribeImageAttribute (mixed into the Front)."""

    version: str
    admin: bool
    images: dict[str, Image]
    _lock: threading.RLock

    def _new_id(self, prefix: str) -> str:
        h = secrets.token_hex(4)
        return f"{prefix}-{h.upper() if self.version == '3' else h}"

    def _ec2_RegisterImage(self, p: dict) -> tuple[int, bytes]:
        location = p.get("ImageLocation")
        if not location:
            raise X.Ec2Error("MissingParameter", "ImageLocation is required (only bundled images can be registered)")
        if "RootDeviceName" in p:
            raise X.Ec2Error("InvalidParameterCombination", "RootDeviceName is not allowed with ImageLocation")
        bucket, _, key = location.lstrip("/").partition("/")
        raw = self.s3_get(bucket, key) if key else None
        if raw is None:
            raise X.Ec2Error("InvalidManifest", f"Failed to read manifest file {location}: not found")
        try:
            m = check_manifest(raw, self.identity.user_cert_obj, self.identity.cloud_key_obj)
        except ManifestRefused as e:
            raise X.Ec2Error("InvalidManifest", f"{location}: {e}") from None
        if m.user != self.identity.account_id:
            raise X.Ec2Error("InvalidManifest", f"Manifest is not accessible: {location} belongs to account {m.user}")
        arch = p.get("Architecture") or m.architecture or "i386"
        if arch not in ("i386", "x86_64"):
            raise X.Ec2Error("InvalidParameterValue", f"unsupported architecture {arch}")
        kernel = p.get("KernelId") or m.kernel_id
        ramdisk = p.get("RamdiskId") or m.ramdisk_id
        if m.image_type in ("kernel", "ramdisk") and not self.admin:
            raise X.Ec2Error("NotAuthorized", f"Only administrators can register {m.image_type} images.")
        if m.image_type == "machine":
            if self.version == "4" and not kernel:
                raise X.Ec2Error("MissingParameter", "Kernel ID must be specified")
            if self.version == "4" and not ramdisk:
                raise X.Ec2Error("MissingParameter", "Ramdisk ID must be specified")
            for ref, kind in ((kernel, "kernel"), (ramdisk, "ramdisk")):
                if ref and (ref not in self.images or self.images[ref].type != kind):
                    raise X.Ec2Error("InvalidParameterValue", f"{ref} is not a registered {kind} image")
        else:
            kernel = ramdisk = None
        name = p.get("Name") or m.name
        image = Image(self._new_id({"machine": "emi", "kernel": "eki", "ramdisk": "eri"}[m.image_type]),
                      m.image_type, location, name, self.identity.account_id, arch, kernel, ramdisk,
                      p.get("Description", ""))
        with self._lock:
            self.images[image.id] = image
        return 200, X.ec2_reply("RegisterImageResponse", f"<imageId>{image.id}</imageId>")

    def _ec2_DeregisterImage(self, p: dict) -> tuple[int, bytes]:
        with self._lock:
            if self.images.pop(p.get("ImageId", ""), None) is None:
                raise X.Ec2Error("InvalidAMIID.NotFound", f"The image id '[{p.get('ImageId')}]' does not exist")
        return 200, X.ec2_reply("DeregisterImageResponse", "<return>true</return>")

    def _ec2_DescribeImages(self, p: dict) -> tuple[int, bytes]:
        ids = [v for k, v in p.items() if k.startswith("ImageId.")]
        filters = X.filters(p)
        with self._lock:
            images = list(self.images.values())
        missing = [i for i in ids if i not in {im.id for im in images}]
        if missing:
            raise X.Ec2Error("InvalidAMIID.NotFound", f"The image id '[{', '.join(missing)}]' does not exist")
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
                f"<item><imageId>{im.id}</imageId><imageLocation>{X.esc(im.location)}</imageLocation>"
                f"<imageState>{im.state}</imageState><imageOwnerId>{im.owner}</imageOwnerId>"
                f"<isPublic>{'true' if im.public else 'false'}</isPublic><architecture>{im.architecture}</architecture>"
                f"<imageType>{im.type}</imageType>"
                + (f"<kernelId>{im.kernel_id}</kernelId>" if im.kernel_id else "")
                + (f"<ramdiskId>{im.ramdisk_id}</ramdiskId>" if im.ramdisk_id else "")
                + f"<name>{X.esc(im.name)}</name><description>{X.esc(im.description)}</description>"
                f"<rootDeviceType>instance-store</rootDeviceType><rootDeviceName>/dev/sda1</rootDeviceName>"
                f"<blockDeviceMapping/><virtualizationType>paravirtual</virtualizationType>"
                f"<hypervisor>kvm</hypervisor></item>")
        return 200, X.ec2_reply("DescribeImagesResponse", f"<imagesSet>{''.join(out)}</imagesSet>")

    def _image(self, image_id: str | None) -> Image:
        with self._lock:
            image = self.images.get(image_id or "")
        if image is None:
            raise X.Ec2Error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")
        return image

    def _ec2_ModifyImageAttribute(self, p: dict) -> tuple[int, bytes]:
        image = self._image(p.get("ImageId"))
        if image.owner != self.identity.account_id:
            raise X.Ec2Error("AuthFailure", "Not authorized to modify image attribute")
        if "Description.Value" in p:
            image.description = p["Description.Value"]
            return 200, X.ec2_reply("ModifyImageAttributeResponse", "<return>true</return>")
        def listed(pattern: str) -> list[str]:
            return [v for k, v in sorted(p.items()) if re.fullmatch(pattern, k)]
        if "Attribute" in p or "OperationType" in p:      # the form up to 2010-06-15
            if p.get("Attribute") != "launchPermission":
                raise X.Ec2Error("InvalidParameterValue", f"unsupported attribute {p.get('Attribute')!r}")
            if p.get("OperationType") not in ("add", "remove"):
                raise X.Ec2Error("InvalidParameterValue", "OperationType must be add or remove")
            users, groups = listed(r"UserId\.\d+"), listed(r"(User)?Group\.\d+")
            changes = {p["OperationType"]: (users, groups)}
        else:
            changes = {op.lower(): (listed(rf"LaunchPermission\.{op}\.\d+\.UserId"),
                                    listed(rf"LaunchPermission\.{op}\.\d+\.Group")) for op in ("Add", "Remove")}
        if not any(u or g for u, g in changes.values()):
            raise X.Ec2Error("MissingParameter", "No userId provided")
        for _, groups in changes.values():
            if any(g != "all" for g in groups):
                raise X.Ec2Error("InvalidParameterValue", "the only launch permission group is \"all\"")
        with self._lock:
            for op, (users, groups) in changes.items():
                if op == "add":
                    image.launch_users.update(users)
                    image.public = image.public or bool(groups)
                else:
                    image.launch_users.difference_update(users)
                    image.public = image.public and not groups
        return 200, X.ec2_reply("ModifyImageAttributeResponse", "<return>true</return>")

    def _ec2_DescribeImageAttribute(self, p: dict) -> tuple[int, bytes]:
        image = self._image(p.get("ImageId"))
        attribute = p.get("Attribute")
        if attribute == "launchPermission":
            items = ("<item><group>all</group></item>" if image.public else "") + "".join(
                f"<item><userId>{u}</userId></item>" for u in sorted(image.launch_users))
            inner = f"<launchPermission>{items}</launchPermission>"
        elif attribute == "description":
            inner = f"<description><value>{X.esc(image.description)}</value></description>"
        elif attribute in ("kernel", "ramdisk"):
            ref = image.kernel_id if attribute == "kernel" else image.ramdisk_id
            inner = f"<{attribute}>" + (f"<value>{ref}</value>" if ref else "") + f"</{attribute}>"
        else:
            raise X.Ec2Error("InvalidParameterValue", f"unsupported attribute {attribute!r}")
        return 200, X.ec2_reply("DescribeImageAttributeResponse", f"<imageId>{image.id}</imageId>{inner}")
