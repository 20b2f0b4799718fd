"""The demo build, baked for real, bundled and published to the 3.x stand-in (test_base_e2e
publishes it to the 4.x stand-in, and takes its EMI back as a base)."""

from __future__ import annotations

import secrets
import shutil

import pytest

from builder.core.record import Build
from builder.bundle.keys import BundleKeys
from builder.cloud.credentials import load_credentials
from builder.cloud.publish import PublishOptions, publish, unpublish
from builder.bundle.build import bundle_build
from eucalyptus_standin.fixtures import euca3, euca4  # noqa: F401


@pytest.mark.bakes
@pytest.mark.e2e
@pytest.mark.parametrize("version", ["3"])
def test_the_demo_build_publishes_and_unpublishes(demo_build, version, request, tmp_path):
    cloud = request.getfixturevalue(f"euca{version}")
    # a copy of the build's record and outputs, so the shared demo build stays as it is
    build = Build.create(tmp_path / "output", "debian-demo")
    for role in ("kernel", "ramdisk", "image"):
        src = demo_build.output_path(role)
        dst = build.dir / src.name
        shutil.copy2(src, dst)  # sparse-aware on Linux for the image
        build.record_output(role, dst)
    build.set("arch", demo_build.data.get("arch", "x86_64"))
    i = cloud.identity
    bundle_build(build, BundleKeys(user_id=i.account_id, cert=i.user_cert, private_key=i.user_key,
                                   cloud_cert=i.cloud_cert))
    creds = load_credentials({"eucarc": str(cloud.eucarc)}, environ={})
    cloud.clear_log()
    bucket = "demo-" + secrets.token_hex(4)
    published = publish(build, creds, PublishOptions(bucket=bucket))
    assert published["image_id"].startswith("emi-") and published["kernel_id"].startswith("eki-")
    parts = sum(len(e["parts"]) for e in build.data["bundle"].values())
    assert len(cloud.puts()) == parts + 3
    cloud.clear_log()
    again = publish(build, creds, PublishOptions(bucket=bucket))
    assert cloud.puts() == [] and again["image_id"] == published["image_id"]
    removed = unpublish(build, creds)
    assert len(removed["images"]) == 3 and removed["bucket"] == bucket
