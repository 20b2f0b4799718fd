"""Publishing a build to Eucalyptus 3.x and 4.x (the stand-in): upload, register,
resume, idempotence, unpublish, and errors a person can act on."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from builder.core.record import Build
from builder.cli.main import main as bake_main
from builder.cloud.clients import make_clients
from builder.cloud.credentials import load_credentials
from builder.cloud.publish import PublishOptions, publish, unpublish
from builder.core.errors import BakeError
from builder.pipeline.stages import publish as publish_stage
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.trio import bundle_build, make_build

pytestmark = pytest.mark.slow


@pytest.fixture
def creds(euca_cloud, clean_env):
    return load_credentials({"eucarc": str(euca_cloud.eucarc)})


@pytest.fixture
def build(euca_cloud, tmp_path):
    b = make_build(tmp_path / "output")
    bundle_build(b, euca_cloud)   # 1 + 1 + 5 parts
    return b


def opts(**kw) -> PublishOptions:
    kw.setdefault("bucket", "pub-" + secrets.token_hex(5))
    kw.setdefault("sleep", lambda s: None)
    return PublishOptions(**kw)


def images_at(cloud, location: str) -> list[dict]:
    ec2 = make_clients(load_credentials({}, environ=cloud.env())).ec2
    return ec2.describe_images(Filters=[{"Name": "manifest-location", "Values": [location]}])["Images"]


def bundle_files(build: Build) -> dict[str, list[str]]:
    """Per role, the file names of the parts then the manifest."""
    out = {}
    for role, entry in build.data["bundle"].items():
        out[role] = [Path(p["path"]).name for p in entry["parts"]] + [Path(entry["manifest"]).name]
    return out


def register_calls(cloud) -> int:
    return sum(1 for r in cloud.front.requests if r.operation == "RegisterImage")


def test_full_publish_uploads_everything_and_registers_eki_eri_emi(euca_cloud, creds, build, caplog):
    o = opts()
    with caplog.at_level(logging.DEBUG):
        cloud = publish(build, creds, o)
    assert cloud["kernel_id"].startswith("eki-")
    assert cloud["ramdisk_id"].startswith("eri-")
    assert cloud["image_id"].startswith("emi-")
    prefix = f"trio/{build.id}"
    assert cloud["prefix"] == prefix and cloud["bucket"] == o.bucket and cloud["bucket_created"]
    files = bundle_files(build)
    assert sorted(euca_cloud.puts()) == sorted(f"/{o.bucket}/{prefix}/{f}" for fs in files.values() for f in fs)
    # each manifest is uploaded after its parts
    order = euca_cloud.puts()
    for fs in files.values():
        assert order.index(f"/{o.bucket}/{prefix}/{fs[-1]}") > max(order.index(f"/{o.bucket}/{prefix}/{f}") for f in fs[:-1])
    (emi,) = images_at(euca_cloud, f"{o.bucket}/{prefix}/test.img.manifest.xml")
    assert (emi["ImageId"], emi["KernelId"], emi["RamdiskId"], emi["Architecture"], emi["ImageType"]) == \
        (cloud["image_id"], cloud["kernel_id"], cloud["ramdisk_id"], "x86_64", "machine")
    (eki,) = images_at(euca_cloud, f"{o.bucket}/{prefix}/vmlinuz-2.6.32-test.manifest.xml")
    assert eki["ImageType"] == "kernel"
    # registered in order kernel, ramdisk, machine; machine names both
    regs = [r.params for r in euca_cloud.front.requests if r.operation == "RegisterImage"]
    assert [p["ImageLocation"].rsplit("/", 1)[1] for p in regs] == [
        "vmlinuz-2.6.32-test.manifest.xml", "initrd.img-2.6.32-test.manifest.xml", "test.img.manifest.xml"]
    assert regs[2]["KernelId"] == cloud["kernel_id"] and regs[2]["RamdiskId"] == cloud["ramdisk_id"]
    assert all("RootDeviceName" not in p for p in regs)
    # build.json has the ids and no secret; neither have the logs
    record = json.loads((build.dir / "build.json").read_text())
    assert record["cloud"]["image_id"] == cloud["image_id"]
    secret = euca_cloud.identity.secret_key
    assert secret not in (build.dir / "build.json").read_text()
    assert secret not in caplog.text


def test_3x_publish_signs_ec2_with_sigv2_and_4x_with_sigv4(euca_cloud, creds, build):
    publish(build, creds, opts())
    ec2 = [r for r in euca_cloud.front.requests if r.service == "ec2"]
    if euca_cloud.version == "3":
        assert all(r.params.get("SignatureVersion") == "2" for r in ec2)
    else:
        assert all("SignatureVersion" not in r.params for r in ec2)


def test_uploads_are_single_puts_without_checksum_headers_and_3x_without_expect(euca_cloud, creds, build):
    publish(build, creds, opts())
    s3 = [r for r in euca_cloud.front.requests if r.service == "s3"]
    assert not any("uploads" in r.query or "uploadId" in r.query or r.method == "POST" for r in s3)
    puts = [r for r in s3 if r.method == "PUT" and r.path.count("/") >= 2]
    assert puts and not any(h.startswith("x-amz-checksum") or h == "x-amz-sdk-checksum-algorithm"
                            for r in puts for h in r.headers)
    assert all(r.headers.get("x-amz-acl") == "aws-exec-read" and "content-md5" in r.headers for r in puts)
    if euca_cloud.version == "3":
        assert not any("expect" in r.headers for r in puts)


def test_an_interrupted_publish_resumes_sending_only_what_is_missing(euca_cloud, creds, build):
    o = opts(attempts=3)
    euca_cloud.fail_puts(after=3)        # kernel part, ramdisk part, first image part get through
    with pytest.raises(BakeError) as e:
        publish(build, creds, o)
    assert "gave up after 3 attempts" in str(e.value) and "run publish again" in str(e.value)
    assert "cloud" not in Build.load(build.dir).data
    first = euca_cloud.puts(r"\.part\.")
    assert len(first) == 3
    euca_cloud.clear_faults()
    euca_cloud.clear_log()
    cloud = publish(build, creds, o)
    prefix = f"/{o.bucket}/trio/{build.id}/"
    resumed = euca_cloud.puts()
    assert sorted(resumed) == sorted(prefix + f for f in
                                     ["test.img.part.01", "test.img.part.02", "test.img.part.03", "test.img.part.04",
                                      "test.img.manifest.xml"])
    assert cloud["uploaded"] == 5 and cloud["already_uploaded"] == 5
    assert cloud["image_id"].startswith("emi-")


def test_a_transient_failure_is_retried_with_backoff(euca_cloud, creds, build):
    sleeps: list[float] = []
    euca_cloud.fail_puts(after=1, times=2)
    cloud = publish(build, creds, opts(sleep=sleeps.append, backoff=0.5))
    assert sleeps == [0.5, 1.0]
    assert cloud["image_id"].startswith("emi-")


def test_a_part_that_differs_in_the_bucket_is_sent_again(euca_cloud, creds, build):
    o = opts()
    publish(build, creds, o)
    key = f"trio/{build.id}/test.img.part.02"
    make_clients(creds).s3.put_object(Bucket=o.bucket, Key=key, Body=b"damaged")
    euca_cloud.clear_log()
    cloud = publish(build, creds, o)
    assert euca_cloud.puts() == [f"/{o.bucket}/{key}"]
    assert register_calls(euca_cloud) == 0 and cloud["uploaded"] == 1


def test_a_second_publish_sends_and_registers_nothing_new(euca_cloud, creds, build):
    o = opts()
    first = publish(build, creds, o)
    euca_cloud.clear_log()
    second = publish(build, creds, o)
    assert euca_cloud.puts() == [] and register_calls(euca_cloud) == 0
    assert {k: second[k] for k in ("kernel_id", "ramdisk_id", "image_id")} == \
        {k: first[k] for k in ("kernel_id", "ramdisk_id", "image_id")}
    assert second["bucket_created"]   # still known to be ours, for unpublish
    assert not any(im["registered_now"] for im in second["images"].values())


def test_an_image_registered_earlier_is_found_by_manifest_location_even_without_a_record(euca_cloud, creds, build):
    o = opts()
    first = publish(build, creds, o)
    build.data.pop("cloud")
    build.save()
    euca_cloud.clear_log()
    second = publish(build, creds, o)
    assert register_calls(euca_cloud) == 0 and second["image_id"] == first["image_id"]


def test_a_rebundled_image_replaces_the_stale_registration(euca_cloud, creds, build, tmp_path):
    o = opts()
    first = publish(build, creds, o)
    # bundle the same image again (new key, so new parts and manifest at the same names)
    shutil.rmtree(build.dir / "bundle")
    bundle_build(build, euca_cloud)
    euca_cloud.clear_log()
    second = publish(build, creds, o)
    assert second["image_id"] != first["image_id"] and second["kernel_id"] != first["kernel_id"]
    deregistered = [r.params["ImageId"] for r in euca_cloud.front.requests if r.operation == "DeregisterImage"]
    assert sorted(deregistered) == sorted([first["kernel_id"], first["ramdisk_id"], first["image_id"]])
    location = f"{o.bucket}/trio/{build.id}/test.img.manifest.xml"
    assert [im["ImageId"] for im in images_at(euca_cloud, location)] == [second["image_id"]]


def test_unpublish_leaves_nothing_behind(euca_cloud, creds, build):
    o = opts()
    cloud = publish(build, creds, o)
    removed = unpublish(build, creds)
    assert sorted(removed["images"]) == sorted([cloud["kernel_id"], cloud["ramdisk_id"], cloud["image_id"]])
    for im in cloud["images"].values():
        assert images_at(euca_cloud, im["manifest_location"]) == []
    s3 = make_clients(creds).s3
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket=o.bucket)
    assert e.value.response["Error"]["Code"] in ("404", "NoSuchBucket")
    assert "cloud" not in Build.load(build.dir).data


def test_unpublish_keeps_a_bucket_it_did_not_create_and_what_else_is_in_it(euca_cloud, creds, build):
    o = opts()
    s3 = make_clients(creds).s3
    s3.create_bucket(Bucket=o.bucket)
    s3.put_object(Bucket=o.bucket, Key="someone-elses", Body=b"keep me")
    cloud = publish(build, creds, o)
    assert not cloud["bucket_created"]
    unpublish(build, creds)
    keys = [k["Key"] for k in s3.list_objects(Bucket=o.bucket).get("Contents", [])]
    assert keys == ["someone-elses"]


def test_unpublish_after_an_interrupted_publish_removes_what_was_uploaded(euca_cloud, creds, build):
    o = opts(attempts=1)
    euca_cloud.fail_puts(after=2)
    with pytest.raises(BakeError):
        publish(build, creds, o)
    euca_cloud.clear_faults()
    unpublish(build, creds, PublishOptions(bucket=o.bucket))
    s3 = make_clients(creds).s3
    assert s3.list_objects(Bucket=o.bucket).get("Contents", []) == []


def test_a_wrong_secret_key_fails_with_a_clear_message(euca_cloud, creds, build):
    wrong = replace(creds, secret_key="definitely-not-the-secret")
    with pytest.raises(BakeError) as e:
        publish(build, wrong, opts())
    msg = str(e.value)
    assert "refused our credentials" in msg and "secret key" in msg
    assert creds.access_key[:4] in msg and creds.access_key not in msg
    assert "definitely-not-the-secret" not in msg and creds.secret_key not in msg
    assert euca_cloud.puts() == []


def test_a_user_who_may_not_register_kernels_is_told_so_not_that_the_key_is_wrong(euca_cloud, creds, build):
    euca_cloud.front.admin = False
    try:
        with pytest.raises(BakeError) as e:
            publish(build, creds, opts())
    finally:
        euca_cloud.front.admin = True
    assert "Only administrators can register kernel images" in str(e.value)
    assert "refused our credentials" not in str(e.value)


def test_publish_bundles_first_when_the_build_has_no_bundles(euca_cloud, creds, tmp_path):
    b = make_build(tmp_path / "output")
    cloud = publish(b, creds, opts())
    assert set(Build.load(b.dir).data["bundle"]) == {"kernel", "ramdisk", "image"}
    assert cloud["image_id"].startswith("emi-")


def test_the_stage_is_skipped_with_a_reason_when_no_cloud_is_configured(clean_env, tmp_path):
    b = make_build(tmp_path / "output")

    class Recipe:
        publish: dict = {}

    out = publish_stage.run_on(b, Recipe())
    assert "no cloud configured" in out["skipped"]
    assert "no cloud configured" in Build.load(b.dir).data["stages"]["publish"]["skipped"]
    Recipe.publish = None
    assert "skipped" in publish_stage.run_on(b, Recipe())


def test_the_stage_publishes_with_the_recipes_publish_section(euca_cloud, clean_env, build):
    class Recipe:
        publish = {"eucarc": str(euca_cloud.eucarc), "bucket": "stage-" + secrets.token_hex(4), "prefix": "lucid/x"}

    out = publish_stage.run_on(build, Recipe())
    # the recipe's prefix is a folder above the build's own names, never a name builds share
    assert out["image_id"].startswith("emi-") and out["prefix"] == f"lucid/x/trio/{build.id}"
    assert out["image_name"] == f"lucid-x-trio-{build.id}"
    assert Build.load(build.dir).data["cloud"]["image_id"] == out["image_id"]


def test_bake_publish_and_unpublish_commands(euca_cloud, clean_env, build, capsys):
    bucket = "cli-" + secrets.token_hex(4)
    assert bake_main(["-q", "publish", str(build.dir), "--eucarc", str(euca_cloud.eucarc), "--bucket", bucket]) == 0
    out = capsys.readouterr().out.split()
    ids = dict(zip(out[::2], out[1::2]))
    assert ids["kernel"].startswith("eki-") and ids["image"].startswith("emi-")
    assert bake_main(["-q", "unpublish", str(build.dir), "--eucarc", str(euca_cloud.eucarc)]) == 0
    assert ids["image"] in capsys.readouterr().out


def test_unpublish_deletes_where_the_build_was_published_though_the_recipe_moved_on(euca_cloud, clean_env,
                                                                                    build, tmp_path):
    recipe = tmp_path / "moved.yml"
    recipe.write_text("name: moved\nrelease: debian/bookworm\npublish:\n  bucket: first-bucket\n  prefix: one\n")
    data = json.loads((build.dir / "build.json").read_text())
    data["recipe"] = {**(data.get("recipe") or {}), "path": str(recipe)}
    (build.dir / "build.json").write_text(json.dumps(data))
    rc = str(euca_cloud.eucarc)
    assert bake_main(["-q", "publish", str(build.dir), "--eucarc", rc]) == 0
    recipe.write_text("name: moved\nrelease: debian/bookworm\npublish:\n  bucket: second-bucket\n  prefix: two\n")
    assert bake_main(["-q", "unpublish", str(build.dir), "--eucarc", rc]) == 0
    s3 = make_clients(load_credentials({"eucarc": rc})).s3
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="first-bucket")
    assert e.value.response["Error"]["Code"] in ("404", "NoSuchBucket")
    assert "cloud" not in Build.load(build.dir).data


def test_bake_publish_without_a_cloud_says_how_to_configure_one(clean_env, tmp_path, capsys):
    b = make_build(tmp_path / "output")
    assert bake_main(["publish", str(b.dir)]) == 1
    assert "no cloud configured" in capsys.readouterr().err


def test_the_project_clients_create_volumes_and_run_instances_the_cloud_accepts(euca_cloud, creds, build):
    cloud = publish(build, creds, opts())
    ec2 = make_clients(creds).ec2
    (inst,) = ec2.run_instances(ImageId=cloud["image_id"], MinCount=1, MaxCount=1)["Instances"]
    vol = ec2.create_volume(Size=1, AvailabilityZone=inst["Placement"]["AvailabilityZone"])  # no ClientToken sent
    assert vol["VolumeId"]
    (rec,) = [r for r in euca_cloud.front.requests if r.operation == "CreateVolume"]
    assert "ClientToken" not in rec.params and rec.status == 200
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_a_build_bundled_without_kernel_and_ramdisk_is_registered_alone_on_3x_and_refused_on_4x(
        euca_cloud, creds, build):
    for role in ("kernel", "ramdisk"):   # a build that made only an image
        build.data["outputs"].pop(role)
        build.data["bundle"].pop(role)
    build.save()
    if euca_cloud.version == "3":
        cloud = publish(build, creds, opts())
        assert cloud["image_id"].startswith("emi-") and cloud["kernel_id"] is None
    else:
        with pytest.raises(BakeError, match="Kernel ID must be specified"):
            publish(build, creds, opts())


@pytest.mark.parametrize("version,s3_sigv4", [(None, False), ("4.2", False), ("4.4", True)])
def test_4x_publish_signs_objectstorage_with_sigv4_only_when_the_cloud_is_4_4(euca4, clean_env, tmp_path,
                                                                               version, s3_sigv4):
    b = make_build(tmp_path / "output")
    bundle_build(b, euca4)
    section = {"eucarc": str(euca4.eucarc), **({"eucalyptus_version": version} if version else {})}
    euca4.clear_log()
    cloud = publish(b, load_credentials(section), opts())
    assert cloud["image_id"].startswith("emi-")
    assert cloud["eucalyptus_version"] == ("4.4+" if s3_sigv4 else "4.0-4.3")
    s3 = [r for r in euca4.front.requests if r.service == "s3"]
    assert s3 and all(("x-amz-content-sha256" in r.headers) == s3_sigv4 for r in s3)
    ec2 = [r for r in euca4.front.requests if r.service == "ec2"]
    assert ec2 and not any("SignatureVersion" in r.params for r in ec2)      # SigV4 on EC2


def test_the_stage_is_skipped_when_the_recipe_turns_publishing_off(euca3, clean_env, tmp_path):
    b = make_build(tmp_path / "output")

    class Recipe:
        publish = {"enabled": False, "eucarc": str(euca3.eucarc)}

    assert "enabled is false" in publish_stage.run_on(b, Recipe())["skipped"]
    assert "cloud" not in Build.load(b.dir).data


def test_bundles_sealed_to_another_cloud_are_made_again_for_this_one_with_the_same_settings(
        euca_cloud, creds, tmp_path):
    from eucalyptus_standin.keys import TestIdentity

    other = TestIdentity.create(tmp_path / "other")
    b = make_build(tmp_path / "output")
    bundle_build(b, euca_cloud, cloud_cert=other.cloud_cert, part_size=128 * 1024)
    b.record_stage("bundle", local=True)
    cloud = publish(b, creds, opts())
    assert cloud["image_id"].startswith("emi-")
    rebundled = Build.load(b.dir).data
    assert len(rebundled["bundle"]["image"]["parts"]) == 3          # 300 kB in 128 KiB parts, as before
    assert rebundled["stages"]["bundle"]["local"] is False


def test_local_bundles_without_certificates_to_rebundle_are_refused_clearly(euca_cloud, build, clean_env):
    build.record_stage("bundle", local=True)
    env = {k: v for k, v in euca_cloud.env().items() if k in ("EC2_URL", "S3_URL", "EC2_ACCESS_KEY", "EC2_SECRET_KEY")}
    bare = load_credentials({}, environ=env)
    with pytest.raises(BakeError, match="bundled locally.*EC2_CERT"):
        publish(build, bare, opts())


def test_a_bucket_of_another_account_is_a_clear_error(euca3, euca4, clean_env, tmp_path):
    taken = "taken-" + secrets.token_hex(4)
    make_clients(load_credentials({}, environ=euca3.env())).s3.create_bucket(Bucket=taken)
    b = make_build(tmp_path / "output")
    bundle_build(b, euca4)
    with pytest.raises(BakeError, match=f"bucket {taken}.*(someone else|another account)"):
        publish(b, load_credentials({"eucarc": str(euca4.eucarc)}), opts(bucket=taken))


def test_the_default_bucket_is_the_accounts_own(euca_cloud, creds, build):
    cloud = publish(build, creds, PublishOptions(sleep=lambda s: None))
    assert cloud["bucket"] == f"bake-images-{euca_cloud.identity.account_id}"
    unpublish(build, creds)


def test_a_clock_far_from_the_clouds_is_named_as_the_cause(euca_cloud, creds, build):
    euca_cloud.front.clock_offset = 3600
    try:
        with pytest.raises(BakeError, match="clock") as e:
            publish(build, creds, opts())
    finally:
        euca_cloud.front.clock_offset = 0
    assert "secret key" not in str(e.value)
