"""`bake verify --cloud` against the Eucalyptus 3.x and 4.x stand-ins: run the published
EMI with its EKI and ERI, wait for running and the ready line on the console, attach a
volume and see the guest's kernel report it, and always terminate and delete."""

from __future__ import annotations

import threading

import pytest

from builder.cloud.clients import make_clients
from builder.cloud.credentials import ENV_NAMES, load_credentials
from builder.cloud.publish import PublishOptions, publish
from builder.errors import BakeError
from builder.verify import FAIL, PASS, SKIP, render_table, verify
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.trio import bundle_build, make_build

BOOT = ("Linux version 6.1.0-50-cloud-amd64 (stand-in)\n"
        "acpiphp: ACPI Hot Plug PCI Controller Driver version: 0.5\n"
        "bake-ready first_boot=yes instance_id={iid} uptime=11.20\n")
DISK = "virtio_blk virtio2: [vdb] 2097152 512-byte logical blocks (1.07 GB/1.00 GiB)\n"


@pytest.fixture
def clients(euca_cloud, monkeypatch):
    for names in ENV_NAMES.values():
        for n in names:
            monkeypatch.delenv(n, raising=False)
    return make_clients(load_credentials({"eucarc": str(euca_cloud.eucarc)}))


@pytest.fixture
def published(euca_cloud, clients, tmp_path):
    b = make_build(tmp_path / "output")
    bundle_build(b, euca_cloud)
    publish(b, load_credentials({"eucarc": str(euca_cloud.eucarc)}),
            PublishOptions(bucket=f"verify-{tmp_path.name[-20:].lower().replace('_', '-')}", sleep=lambda s: None),
            clients=clients)
    return b


class Guest:
    """Plays the guest's console on the stand-in: boots when the instance exists, and
    reports a disk once the volume is attached (if `sees_volumes`)."""

    def __init__(self, cloud, *, boots=True, sees_volumes=True):
        self.cloud, self.boots, self.sees = cloud, boots, sees_volumes
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        front = self.cloud.front
        while not self.stop.wait(0.05):
            for iid in list(front.instances):
                text = BOOT.format(iid=iid) if self.boots else "Kernel panic - not syncing: VFS\n"
                attached = any(v["attached"] is not None for v in front.volumes.values())
                front.console_output[iid] = text + (DISK if attached and self.sees and self.boots else "")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def _all_gone(cloud, clients):
    states = {r["Instances"][0]["State"]["Name"] for r in clients.ec2.describe_instances()["Reservations"]}
    assert states <= {"terminated", "shutting-down"}
    assert not cloud.front.volumes, "every volume the verification made was deleted"


def test_cloud_verify_boots_the_published_emi_with_its_eki_and_eri_and_cleans_up(euca_cloud, clients, published):
    with Guest(euca_cloud):
        report = verify(published, cloud=True, clients=clients, poll_seconds=0.2)
    print(render_table(report))
    r = {c.name: c for c in report.results}
    assert r["boots"].status == PASS and "bake-ready" in r["boots"].evidence["ready_line"]
    assert r["acpiphp"].status == PASS
    assert r["volume-hotplug"].status == PASS and r["volume-hotplug"].evidence["guest_device"] == "vdb"
    assert r["metadata"].status == SKIP and "shell in the guest" in r["metadata"].summary
    run = [q for q in euca_cloud.front.requests if q.operation == "RunInstances"][-1]
    cloud = published.data["cloud"]
    assert (run.params["ImageId"], run.params["KernelId"], run.params["RamdiskId"]) == \
        (cloud["image_id"], cloud["kernel_id"], cloud["ramdisk_id"])
    assert any(q.operation == "AttachVolume" and q.params["Device"] == "/dev/vdb" for q in euca_cloud.front.requests)
    assert report.ok and published.data["verify"]["mode"] == "cloud"
    _all_gone(euca_cloud, clients)


def test_cloud_verify_fails_and_still_cleans_up_when_the_guest_never_sees_the_volume(euca_cloud, clients, published):
    with Guest(euca_cloud, sees_volumes=False):
        report = verify(published, cloud=True, clients=clients, poll_seconds=0.2, volume_timeout=4)
    r = {c.name: c for c in report.results}
    assert r["volume-hotplug"].status == FAIL and "new 1 GiB disk" in r["volume-hotplug"].summary
    assert published.data["result"] == "failed"
    _all_gone(euca_cloud, clients)


def test_cloud_verify_fails_boots_with_the_console_tail(euca_cloud, clients, published):
    with Guest(euca_cloud, boots=False):
        report = verify(published, cloud=True, clients=clients, poll_seconds=0.2, boot_timeout=5)
    boots = report.results[0]
    assert boots.status == FAIL and "Kernel panic" in boots.evidence["console_tail"]
    assert all(c.status == SKIP for c in report.results[1:])
    _all_gone(euca_cloud, clients)


def test_cloud_verify_terminates_the_instance_on_ctrl_c(euca_cloud, clients, published):
    def interrupt(seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(published, cloud=True, clients=clients, wait=interrupt)
    _all_gone(euca_cloud, clients)


def test_cloud_verify_needs_a_published_build(tmp_path, clients):
    b = make_build(tmp_path / "output")
    with pytest.raises(BakeError, match="not published"):
        verify(b, cloud=True, clients=clients)
