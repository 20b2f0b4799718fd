"""The EC2 side of publishing: finding, registering and deregistering images. Ids are
taken as the cloud gives them (eki-/eri-/emi- on Eucalyptus), never assumed to be ami-."""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .calls import cloud_error, error_code
from .clients import Clients
from .credentials import Credentials

log = logging.getLogger("bake.cloud")


def find_images(clients: Clients, location: str, creds: Credentials) -> list[dict]:
    """Images (not deregistered) already registered for manifest `location`."""
    try:
        r = clients.ec2.describe_images(Owners=["self"], Filters=[{"Name": "manifest-location", "Values": [location]}])
    except ClientError as e:
        raise cloud_error(e, f"looking up images for {location}", creds) from None
    return [im for im in r.get("Images", [])
            if im.get("ImageLocation") == location and im.get("State", "available") not in ("deregistered", "failed")]


def register(clients: Clients, location: str, name: str, image_type: str, arch: str, creds: Credentials, *,
             kernel_id: str | None = None, ramdisk_id: str | None = None, replace: bool = False) -> tuple[str, bool]:
    """The id of the image registered for `location` (an existing one reused unless
    `replace` or its kernel/ramdisk differ); (id, True) when registered now. The image it
    replaces is deregistered: the caller makes sure `location` is in its own build's
    folder (publish checks the owner of every object there first)."""
    for im in find_images(clients, location, creds):
        same = (image_type != "machine"
                or (im.get("KernelId") == kernel_id and im.get("RamdiskId") == ramdisk_id))
        if same and not replace:
            log.info("%s is already registered as %s", location, im["ImageId"])
            return im["ImageId"], False
        log.info("deregistering %s: its bundle or kernel/ramdisk changed", im["ImageId"])
        deregister(clients, im["ImageId"], creds)
    kw: dict[str, Any] = {"ImageLocation": location, "Name": name, "Architecture": arch}
    if kernel_id:
        kw["KernelId"] = kernel_id
    if ramdisk_id:
        kw["RamdiskId"] = ramdisk_id
    # No RootDeviceName: not allowed with a manifest; the cloud picks its default.
    try:
        image_id = clients.ec2.register_image(**kw)["ImageId"]
    except ClientError as e:
        raise cloud_error(e, f"registering {location}", creds) from None
    log.info("registered %s as %s", location, image_id)
    return image_id, True


def deregister(clients: Clients, image_id: str, creds: Credentials) -> None:
    """Deregister `image_id`; one already gone is fine."""
    try:
        clients.ec2.deregister_image(ImageId=image_id)
    except ClientError as e:
        if error_code(e) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
            raise cloud_error(e, f"deregistering {image_id}", creds) from None


def check_credentials(clients: Clients, creds: Credentials) -> None:
    """One cheap signed call, so that a wrong key fails first and clearly."""
    try:
        clients.ec2.describe_availability_zones()
    except (ClientError, BotoCoreError) as e:
        raise cloud_error(e, f"connecting to {creds.ec2_url}", creds) from None


def grant_public_launch(clients: Clients, image_id: str, creds: Credentials) -> None:
    """Let every account launch `image_id` (launch permission for the group "all").

    Sent in the query form of EC2 API versions up to 2010-06-15
    (`Attribute=launchPermission&OperationType=add&UserGroup.1=all`): Eucalyptus 3.0 to
    3.2 bind only that form and refuse `LaunchPermission.Add.1.Group` as a field they
    cannot bind; 3.3 and every 4.x accept both, and so does EC2."""
    try:
        clients.ec2.modify_image_attribute(ImageId=image_id, Attribute="launchPermission", OperationType="add",
                                           UserGroups=["all"])
    except ClientError as e:
        raise cloud_error(e, f"granting launch permission on {image_id} to all", creds) from None


def launch_permissions(clients: Clients, image_id: str, creds: Credentials) -> list[dict[str, str]]:
    """Who may launch `image_id`, as the cloud says: [{"Group": "all"}, {"UserId": ...}]."""
    try:
        r = clients.ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    except ClientError as e:
        raise cloud_error(e, f"reading the launch permissions of {image_id}", creds) from None
    return list(r.get("LaunchPermissions") or [])
