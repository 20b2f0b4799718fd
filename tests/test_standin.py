"""The Eucalyptus stand-in refuses what Eucalyptus refuses, and accepts what it accepts.

Requests here are made with plain boto3/botocore on the test side (not the project's
client setup), or signed by hand where a correct client would never send them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from eucalyptus_standin import eucalyptus_standin
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.keys import TestIdentity
from eucalyptus_standin.trio import bundle_build, make_build


def ec2_client(cloud, sig: str | None = None, secret: str | None = None):
    sig = sig or ("v2" if cloud.version == "3" else "v4")
    return boto3.client("ec2", endpoint_url=cloud.ec2_url, region_name="eucalyptus",
                        aws_access_key_id=cloud.identity.access_key,
                        aws_secret_access_key=secret or cloud.identity.secret_key,
                        config=Config(signature_version=sig, retries={"total_max_attempts": 1}))


def _full_path(request, **_):
    request.auth_path = urlsplit(request.url).path


def s3_client(cloud, sig: str = "s3", *, fix_path: bool = True, secret: str | None = None):
    c = boto3.client("s3", endpoint_url=cloud.s3_url, region_name="eucalyptus",
                     aws_access_key_id=cloud.identity.access_key,
                     aws_secret_access_key=secret or cloud.identity.secret_key,
                     config=Config(signature_version=sig, s3={"addressing_style": "path"},
                                   request_checksum_calculation="when_required",
                                   response_checksum_validation="when_required",
                                   retries={"total_max_attempts": 1}))
    if fix_path and sig == "s3":
        c.meta.events.register("before-sign.s3", _full_path)
    return c


def bucket_name() -> str:
    return "sb-" + secrets.token_hex(5)


def code_of(e: pytest.ExceptionInfo) -> str:
    return e.value.response["Error"]["Code"]


def sigv2_params(cloud, action: dict, *, path: str | None = None, age: float = 0) -> dict:
    """A SigV2-signed EC2 query, signed here from the specification, `age` seconds old."""
    when = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=age)
    params = {**action, "AWSAccessKeyId": cloud.identity.access_key, "SignatureVersion": "2",
              "SignatureMethod": "HmacSHA256", "Version": "2013-08-15",
              "Timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = path or urlsplit(cloud.ec2_url).path
    canonical = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    to_sign = f"POST\n{cloud.host}:{cloud.port}\n{path}\n{canonical}"
    params["Signature"] = base64.b64encode(
        hmac.new(cloud.identity.secret_key.encode(), to_sign.encode(), hashlib.sha256).digest()).decode()
    return params


# --- service paths ---------------------------------------------------------------------

def test_3x_serves_eucalyptus_and_walrus_paths_only(euca3):
    assert euca3.ec2_url.endswith("/services/Eucalyptus") and euca3.s3_url.endswith("/services/Walrus")
    assert ec2_client(euca3).describe_availability_zones()["AvailabilityZones"]
    assert requests.get(euca3.base_url + "/services/compute").status_code == 404
    assert requests.get(euca3.base_url + "/services/objectstorage/x").status_code == 404


def test_4x_serves_compute_and_objectstorage_and_the_legacy_paths(euca4):
    assert euca4.ec2_url.endswith("/services/compute") and euca4.s3_url.endswith("/services/objectstorage")
    assert ec2_client(euca4).describe_availability_zones()["AvailabilityZones"]
    legacy = boto3.client("ec2", endpoint_url=euca4.base_url + "/services/Eucalyptus", region_name="eucalyptus",
                          aws_access_key_id=euca4.identity.access_key,
                          aws_secret_access_key=euca4.identity.secret_key)
    assert legacy.describe_availability_zones()["AvailabilityZones"]


# --- signatures --------------------------------------------------------------------------

@pytest.mark.parametrize("sig", ["v2", "v4"])
def test_ec2_accepts_sigv2_and_sigv4(euca_cloud, sig):
    assert ec2_client(euca_cloud, sig).describe_availability_zones()["AvailabilityZones"]


@pytest.mark.parametrize("sig", ["v2", "v4"])
def test_ec2_refuses_a_wrong_secret(euca_cloud, sig):
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud, sig, secret="not-the-secret").describe_availability_zones()
    assert code_of(e) == "AuthFailure"


def test_ec2_refuses_a_sigv2_request_altered_after_signing(euca3):
    params = sigv2_params(euca3, {"Action": "DescribeAvailabilityZones"})
    assert requests.post(euca3.ec2_url, data=params).status_code == 200
    params["ZoneName.1"] = "other"
    r = requests.post(euca3.ec2_url, data=params)
    assert r.status_code == 403 and "AuthFailure" in r.text


def hmacv1_put(cloud, bucket: str, key: str, body: bytes, *, age: float = 0) -> requests.Response:
    """An HmacV1-signed PUT (full path as the canonical resource), signed here from the
    specification, its Date `age` seconds old."""
    import email.utils
    path = f"{urlsplit(cloud.s3_url).path}/{bucket}/{key}"
    date = email.utils.formatdate(time.time() - age, usegmt=True)
    to_sign = f"PUT\n\napplication/octet-stream\n{date}\n{path}"
    sig = base64.b64encode(hmac.new(cloud.identity.secret_key.encode(), to_sign.encode(), hashlib.sha1).digest())
    return requests.put(cloud.base_url + path, data=body, headers={
        "Date": date, "Content-Type": "application/octet-stream",
        "Authorization": f"AWS {cloud.identity.access_key}:{sig.decode()}"})


def test_requests_signed_too_long_ago_are_refused(euca_cloud):
    assert requests.post(euca_cloud.ec2_url, data=sigv2_params(euca_cloud, {"Action": "DescribeAvailabilityZones"})).ok
    r = requests.post(euca_cloud.ec2_url, data=sigv2_params(euca_cloud, {"Action": "DescribeAvailabilityZones"},
                                                            age=3600))
    assert r.status_code == 403 and "RequestExpired" in r.text
    bucket = bucket_name()
    s3_client(euca_cloud).create_bucket(Bucket=bucket)
    assert hmacv1_put(euca_cloud, bucket, "k", b"x").status_code == 200
    r = hmacv1_put(euca_cloud, bucket, "k", b"x", age=3600)
    assert r.status_code == 403 and "RequestTimeTooSkewed" in r.text


def test_ec2_refuses_an_unsigned_request(euca3):
    r = requests.post(euca3.ec2_url, data={"Action": "DescribeAvailabilityZones", "Version": "2013-08-15"})
    assert r.status_code == 403


def test_ec2_refuses_a_sigv2_request_signed_for_another_path(euca3):
    params = sigv2_params(euca3, {"Action": "DescribeAvailabilityZones"}, path="/")
    r = requests.post(euca3.ec2_url, data=params)
    assert r.status_code == 403 and "AuthFailure" in r.text


def test_walrus_refuses_bucket_operations_signed_with_botocores_trailing_slash_path(euca_cloud):
    plain = s3_client(euca_cloud, fix_path=False)
    with pytest.raises(ClientError) as e:
        plain.create_bucket(Bucket=bucket_name())
    assert code_of(e) == "SignatureDoesNotMatch"


def test_walrus_accepts_hmacv1_over_the_full_path_and_the_stripped_path(euca_cloud):
    bucket = bucket_name()
    s3_client(euca_cloud).create_bucket(Bucket=bucket)  # full path signed
    # botocore's own auth_path for objects is /bucket/key: the stripped form, accepted
    s3_client(euca_cloud, fix_path=False).put_object(Bucket=bucket, Key="a/b", Body=b"x")
    assert s3_client(euca_cloud).get_object(Bucket=bucket, Key="a/b")["Body"].read() == b"x"


def test_walrus_refuses_a_wrong_secret(euca_cloud):
    bucket = bucket_name()
    s3_client(euca_cloud).create_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as e:
        s3_client(euca_cloud, secret="wrong").put_object(Bucket=bucket, Key="k", Body=b"x")
    assert code_of(e) == "SignatureDoesNotMatch"


def test_walrus_3x_refuses_sigv4_and_4x_accepts_it(euca3, euca4):
    with pytest.raises(ClientError) as e:
        s3_client(euca3, "s3v4").create_bucket(Bucket=bucket_name())
    assert code_of(e) == "AccessDenied"
    bucket = bucket_name()
    s3_client(euca4, "s3v4").create_bucket(Bucket=bucket)
    s3_client(euca4, "s3v4").put_object(Bucket=bucket, Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3_client(euca4, "s3v4", secret="wrong").put_object(Bucket=bucket, Key="k", Body=b"y")
    assert code_of(e) == "SignatureDoesNotMatch"


# --- object storage behaviour ----------------------------------------------------------------

def test_a_bucket_belongs_to_the_account_that_made_it(euca3, euca4):
    bucket = bucket_name()
    s3_client(euca3).create_bucket(Bucket=bucket)
    other = s3_client(euca4, "s3v4")
    with pytest.raises(ClientError) as e:
        other.head_bucket(Bucket=bucket)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as e:
        other.create_bucket(Bucket=bucket)
    assert code_of(e) == "BucketAlreadyExists"
    s3_client(euca3).delete_bucket(Bucket=bucket)
    other.create_bucket(Bucket=bucket)     # free again once deleted


def test_walrus_3x_refuses_multipart_uploads(euca3):
    s3 = s3_client(euca3)
    bucket = bucket_name()
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as e:
        s3.create_multipart_upload(Bucket=bucket, Key="big")
    assert code_of(e) == "NotImplemented"


def test_objectstorage_4x_allows_multipart_uploads(euca4):
    s3 = s3_client(euca4, "s3v4")
    bucket = bucket_name()
    s3.create_bucket(Bucket=bucket)
    assert s3.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]


def test_injected_put_failures_hit_only_matching_keys_and_can_be_transient(euca3):
    s3 = s3_client(euca3)
    bucket = bucket_name()
    s3.create_bucket(Bucket=bucket)
    euca3.fail_puts(after=1, times=1)
    try:
        s3.put_object(Bucket=bucket, Key="p/x.part.00", Body=b"1")
        s3.put_object(Bucket=bucket, Key="p/x.manifest.xml", Body=b"m")
        with pytest.raises(ClientError):
            s3.put_object(Bucket=bucket, Key="p/x.part.01", Body=b"2")
        s3.put_object(Bucket=bucket, Key="p/x.part.01", Body=b"2")
    finally:
        euca3.clear_faults()


# --- strict parameter binding ---------------------------------------------------------------

def test_create_volume_with_botocores_client_token_is_refused(euca_cloud):
    ec2 = ec2_client(euca_cloud)
    zone = ec2.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    with pytest.raises(ClientError) as e:
        ec2.create_volume(Size=1, AvailabilityZone=zone)   # botocore fills in ClientToken
    assert code_of(e) == "InvalidParameter"
    assert "ClientToken" in e.value.response["Error"]["Message"]


def test_an_unknown_parameter_is_refused_even_when_correctly_signed(euca3):
    r = requests.post(euca3.ec2_url, data=sigv2_params(euca3, {"Action": "DescribeImages", "Frobnicate": "1"}))
    assert r.status_code == 400 and "Failed to bind the following fields: Frobnicate" in r.text


# --- registration --------------------------------------------------------------------------

@pytest.fixture
def bundled(euca_cloud, tmp_path):
    """A build bundled for this cloud and uploaded (not registered); returns (cloud, locations)."""
    build = make_build(tmp_path / "out")
    section = bundle_build(build, euca_cloud)
    return euca_cloud, upload_bundles(euca_cloud, build, section)


def upload_bundles(cloud, build, section) -> dict[str, str]:
    s3 = s3_client(cloud)
    bucket = bucket_name()
    s3.create_bucket(Bucket=bucket)
    locations = {}
    for role, entry in section.items():
        for p in [part["path"] for part in entry["parts"]] + [entry["manifest"]]:
            s3.put_object(Bucket=bucket, Key=f"{role}/{Path(p).name}", Body=(build.dir / p).read_bytes())
        locations[role] = f"{bucket}/{role}/{Path(entry['manifest']).name}"
    return locations


def test_register_keeps_types_kernel_ramdisk_and_location_with_eucalyptus_ids(bundled):
    cloud, loc = bundled
    ec2 = ec2_client(cloud)
    eki = ec2.register_image(ImageLocation=loc["kernel"], Name="t-kernel", Architecture="x86_64")["ImageId"]
    eri = ec2.register_image(ImageLocation=loc["ramdisk"], Name="t-ramdisk", Architecture="x86_64")["ImageId"]
    emi = ec2.register_image(ImageLocation=loc["image"], Name="t-image", Architecture="x86_64",
                             KernelId=eki, RamdiskId=eri)["ImageId"]
    assert eki.startswith("eki-") and eri.startswith("eri-") and emi.startswith("emi-")

    def ids(**filters):
        f = [{"Name": k.replace("_", "-"), "Values": [v]} for k, v in filters.items()]
        return [im["ImageId"] for im in ec2.describe_images(Filters=f)["Images"]]

    assert ids(manifest_location=loc["image"]) == [emi]
    assert ids(manifest_location=loc["kernel"]) == [eki]
    assert emi in ids(image_type="machine") and eki not in ids(image_type="machine")
    assert ids(image_type="kernel", manifest_location=loc["kernel"]) == [eki]
    assert ids(kernel_id=eki) == [emi] and ids(ramdisk_id=eri) == [emi]
    (im,) = ec2.describe_images(ImageIds=[emi])["Images"]
    assert (im["KernelId"], im["RamdiskId"], im["ImageType"], im["ImageLocation"], im["RootDeviceType"]) == \
        (eki, eri, "machine", loc["image"], "instance-store")
    ec2.deregister_image(ImageId=emi)
    assert ids(manifest_location=loc["image"]) == []
    with pytest.raises(ClientError) as e:
        ec2.describe_images(ImageIds=[emi])
    assert code_of(e) == "InvalidAMIID.NotFound"


def test_register_refuses_root_device_name_with_a_manifest(bundled):
    cloud, loc = bundled
    with pytest.raises(ClientError) as e:
        ec2_client(cloud).register_image(ImageLocation=loc["kernel"], Name="t-kernel", RootDeviceName="/dev/sda1")
    assert code_of(e) == "InvalidParameterCombination"


def test_register_refuses_a_manifest_that_is_not_in_the_store(euca_cloud):
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud).register_image(ImageLocation="nobucket/none.manifest.xml", Name="missing")
    assert code_of(e) == "InvalidManifest"


def test_register_refuses_a_manifest_that_does_not_parse(euca_cloud):
    s3 = s3_client(euca_cloud)
    bucket = bucket_name()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="bad.manifest.xml", Body=b"<manifest><image>")
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud).register_image(ImageLocation=f"{bucket}/bad.manifest.xml", Name="bad")
    assert code_of(e) == "InvalidManifest" and "does not parse" in e.value.response["Error"]["Message"]


def test_register_refuses_a_manifest_edited_after_signing(bundled):
    cloud, loc = bundled
    s3 = s3_client(cloud)
    bucket, _, key = loc["kernel"].partition("/")
    raw = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=raw.replace(b"<size>3000</size>", b"<size>3001</size>"))
    with pytest.raises(ClientError) as e:
        ec2_client(cloud).register_image(ImageLocation=loc["kernel"], Name="t-kernel")
    assert "signature does not verify" in e.value.response["Error"]["Message"]


def test_register_refuses_a_manifest_signed_by_another_user(euca_cloud, tmp_path):
    other = TestIdentity.create(tmp_path / "other")
    build = make_build(tmp_path / "out")
    section = bundle_build(build, euca_cloud, user_cert=other.user_cert, user_key=other.user_key)
    loc = upload_bundles(euca_cloud, build, section)
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud).register_image(ImageLocation=loc["kernel"], Name="t-kernel")
    assert "signature does not verify" in e.value.response["Error"]["Message"]


def test_register_refuses_a_bundle_encrypted_for_another_cloud(euca_cloud, tmp_path):
    other = TestIdentity.create(tmp_path / "other")
    build = make_build(tmp_path / "out")
    section = bundle_build(build, euca_cloud, cloud_cert=other.cloud_cert)
    loc = upload_bundles(euca_cloud, build, section)
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud).register_image(ImageLocation=loc["kernel"], Name="t-kernel")
    assert "ec2_encrypted_key does not decrypt" in e.value.response["Error"]["Message"]


def test_4x_refuses_a_machine_image_without_kernel_and_ramdisk(euca4, tmp_path):
    build = make_build(tmp_path / "out")
    loc = upload_bundles(euca4, build, bundle_build(build, euca4))
    with pytest.raises(ClientError) as e:
        ec2_client(euca4).register_image(ImageLocation=loc["image"], Name="t-image", Architecture="x86_64")
    assert code_of(e) == "MissingParameter" and "Kernel ID" in e.value.response["Error"]["Message"]


def test_only_administrators_may_register_kernels_and_ramdisks(bundled):
    cloud, loc = bundled
    cloud.front.admin = False
    try:
        with pytest.raises(ClientError) as e:
            ec2_client(cloud).register_image(ImageLocation=loc["kernel"], Name="t-kernel")
        assert code_of(e) == "NotAuthorized"
    finally:
        cloud.front.admin = True


def test_register_refuses_a_kernel_id_that_is_not_a_kernel(bundled):
    cloud, loc = bundled
    ec2 = ec2_client(cloud)
    eri = ec2.register_image(ImageLocation=loc["ramdisk"], Name="t-ramdisk")["ImageId"]
    with pytest.raises(ClientError) as e:
        ec2.register_image(ImageLocation=loc["image"], Name="t-image", KernelId=eri, RamdiskId=eri)
    assert code_of(e) == "InvalidParameterValue"


# --- instances and volumes -------------------------------------------------------------------

def wait_for(fn, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        v = fn()
        if not seen or seen[-1] != v:
            seen.append(v)
        if v == want:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never reached {want!r}; saw {seen}")


@pytest.mark.slow
def test_instances_and_volumes_change_state_after_a_delay(bundled):
    cloud, loc = bundled
    ec2 = ec2_client(cloud)
    eki = ec2.register_image(ImageLocation=loc["kernel"], Name="t-kernel")["ImageId"]
    eri = ec2.register_image(ImageLocation=loc["ramdisk"], Name="t-ramdisk")["ImageId"]
    emi = ec2.register_image(ImageLocation=loc["image"], Name="t-image", KernelId=eki, RamdiskId=eri)["ImageId"]
    (inst,) = ec2.run_instances(ImageId=emi, MinCount=1, MaxCount=1, InstanceType="m1.small")["Instances"]
    iid = inst["InstanceId"]
    assert inst["State"]["Name"] == "pending"

    def state():
        return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]

    def running_ids():
        f = [{"Name": "instance-state-name", "Values": ["running"]}]
        return [i["InstanceId"] for r in ec2.describe_instances(Filters=f)["Reservations"] for i in r["Instances"]]

    assert iid not in running_ids()           # the state filter follows the delayed state
    assert wait_for(state, "running") == ["pending", "running"]
    assert iid in running_ids()
    (desc,) = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"]
    assert (desc["ImageId"], desc["KernelId"], desc["RamdiskId"]) == (emi, eki, eri)
    cloud.front.console_output[iid] = "hello from the guest\n"
    assert ec2.get_console_output(InstanceId=iid)["Output"] == "hello from the guest\n"

    zone = desc["Placement"]["AvailabilityZone"]
    raw = boto3.client("ec2", endpoint_url=cloud.ec2_url, region_name="eucalyptus",
                       aws_access_key_id=cloud.identity.access_key, aws_secret_access_key=cloud.identity.secret_key)
    def drop_token(params, **_):
        params["body"].pop("ClientToken", None)   # returning None lets the call go on
    raw.meta.events.register("before-call.ec2.CreateVolume", drop_token)
    vid = raw.create_volume(Size=1, AvailabilityZone=zone)["VolumeId"]

    def vol():
        v = ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
        return v["State"], tuple(a["State"] for a in v.get("Attachments", []))

    assert wait_for(vol, ("available", ())) == [("creating", ()), ("available", ())]
    f = [{"Name": "status", "Values": ["available"]}]
    assert vid in [v["VolumeId"] for v in ec2.describe_volumes(Filters=f)["Volumes"]]
    with pytest.raises(ClientError) as e:
        ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="bad device name")
    assert code_of(e) == "InvalidParameterValue"
    ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/vdb")
    assert wait_for(vol, ("in-use", ("attached",))) == [("in-use", ("attaching",)), ("in-use", ("attached",))]
    ec2.detach_volume(VolumeId=vid, InstanceId=iid)
    assert wait_for(vol, ("available", ()))[-1] == ("available", ())
    ec2.delete_volume(VolumeId=vid)
    ec2.terminate_instances(InstanceIds=[iid])
    assert wait_for(state, "terminated") == ["shutting-down", "terminated"]


def test_run_instances_refuses_an_image_that_is_not_registered(euca_cloud):
    with pytest.raises(ClientError) as e:
        ec2_client(euca_cloud).run_instances(ImageId="emi-00000000", MinCount=1, MaxCount=1)
    assert code_of(e) == "InvalidAMIID.NotFound"


def test_a_standin_can_be_started_and_stopped_on_its_own(tmp_path):
    with eucalyptus_standin("4", tmp_path) as cloud:
        assert cloud.eucarc.is_file() and cloud.identity.cloud_key.is_file()
        assert "EC2_SECRET_KEY" in cloud.env()
        url = cloud.ec2_url
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)
