"""What the cloud has, as retention (`bake gc --cloud`) reads it: this account's images,
the instances and what they were started from, and the objects under a prefix. Reads
only; the calls every Eucalyptus since UEC answers (DescribeImages with an owner,
DescribeInstances without filters, ListObjects version 1)."""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from .calls import MISSING_CODES, cloud_error, error_code
from .clients import Clients
from .credentials import Credentials


@dataclass
class Instance:
    id: str
    state: str
    image_id: str | None
    kernel_id: str | None
    ramdisk_id: str | None


def own_images(clients: Clients, creds: Credentials) -> list[dict]:
    """The images this account registered, as DescribeImages gives them."""
    try:
        return list(clients.ec2.describe_images(Owners=["self"]).get("Images", []))
    except (ClientError, BotoCoreError) as e:
        raise cloud_error(e, "listing this account's images", creds) from None


def instances(clients: Clients, creds: Credentials) -> list[Instance]:
    """Every instance the account can see, in any state (states are filtered by the
    caller: filters differ between Eucalyptus releases)."""
    found = []
    try:
        for page in clients.ec2.get_paginator("describe_instances").paginate():
            for res in page.get("Reservations", []):
                for inst in res.get("Instances", []):
                    found.append(Instance(inst["InstanceId"], (inst.get("State") or {}).get("Name", "?"),
                                          inst.get("ImageId"), inst.get("KernelId"), inst.get("RamdiskId")))
    except (ClientError, BotoCoreError) as e:
        raise cloud_error(e, "listing instances", creds) from None
    return found


def keys_under(clients: Clients, bucket: str, folder: str, creds: Credentials) -> list[str]:
    """The keys directly under `bucket/folder/` (not in folders below it); none when the
    bucket is gone."""
    prefix = folder.strip("/") + "/"
    try:
        keys = [o["Key"] for page in clients.s3.get_paginator("list_objects").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
    except ClientError as e:
        if error_code(e) in MISSING_CODES:
            return []
        raise cloud_error(e, f"listing {bucket}/{prefix}", creds) from None
    except BotoCoreError as e:
        raise cloud_error(e, f"listing {bucket}/{prefix}", creds) from None
    return [k for k in keys if "/" not in k[len(prefix):]]


def head_object(clients: Clients, bucket: str, key: str, creds: Credentials) -> dict | None:
    """What S3 says of bucket/key (HeadObject), None when it is not there (or the bucket
    is gone)."""
    try:
        return clients.s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if error_code(e) in MISSING_CODES:
            return None
        raise cloud_error(e, f"checking {bucket}/{key}", creds) from None
    except BotoCoreError as e:
        raise cloud_error(e, f"checking {bucket}/{key}", creds) from None


def has_object(clients: Clients, bucket: str, key: str, creds: Credentials) -> bool:
    """Whether bucket/key is there now (False when the bucket is gone)."""
    return head_object(clients, bucket, key, creds) is not None
