"""`bake verify --cloud` against the Eucalyptus 3.x and 4.x stand-ins: run the published
EMI with its EKI and ERI, wait for running and the ready line on the console, attach a
volume and see the guest's kernel report it, and always terminate and delete.

No guest boots here: `Guest` writes the console a booting guest would show.

Every verification here runs with bounded waits (`SAFETY_NETS`): a test whose event never
comes fails within minutes, it does not poll for the defaults' five or ten. A timeout a
test relies on to fail a check leaves several seconds beyond the stand-in's 1.5 s state
changes, for a machine two or three times slower than usual."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import pytest

from builder.cloud.clients import make_clients
from builder.cloud.credentials import ENV_NAMES, load_credentials
from builder.cloud.publish import PublishOptions, publish
from builder.core.errors import BakeError
from builder.verify import FAIL, PASS, SKIP, render_table, verify
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.trio import bundle_build, make_build

pytestmark = pytest.mark.slow

BOOT = ("Linux version 6.1.0-50-cloud-amd64 (stand-in)\n"
        "acpiphp: ACPI Hot Plug PCI Controller Driver version: 0.5\n"
        "bake-ready first_boot=yes instance_id={iid} uptime=11.20\n")
DISK = "virtio_blk virtio2: [vdb] 2097152 512-byte logical blocks (1.07 GB/1.00 GiB)\n"
# Upper bounds only, far above what any step takes here even on a loaded machine; the
# defaults (300 s to boot, 600 s to clean up) would let a broken test poll for minutes.
SAFETY_NETS = {"boot_timeout": 60.0, "volume_timeout": 60.0, "cleanup_timeout": 60.0, "poll_seconds": 0.2}


def cloud_verify(build, clients, **options):
    """`verify(build, cloud=True)` with the safety nets, which `options` override."""
    return verify(build, cloud=True, clients=clients, **{**SAFETY_NETS, **options})


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
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            while not self.stop.wait(0.05):
                self.play()
        except BaseException as e:      # the test fails at the block's end, not by a wait running out
            self.error = e

    def play(self):
        front = self.cloud.front
        # Copied under the front's lock: the server's threads add and remove entries meanwhile.
        with front._lock:
            instances = list(front.instances)
            volumes = list(front.volumes.values())
        attached = any(v["attached"] is not None for v in volumes)
        for iid in instances:
            text = BOOT.format(iid=iid) if self.boots else "Kernel panic - not syncing: VFS\n"
            front.console_output[iid] = text + (DISK if attached and self.sees and self.boots else "")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.stop.set()
        self.thread.join(10)
        if exc_type is None:
            assert not self.thread.is_alive(), "the guest's console writer did not stop"
            assert self.error is None, f"the guest's console writer failed: {self.error!r}"


@contextlib.contextmanager
def on_request(cloud, fn):
    """Call `fn(record)` on every request the stand-in answers, for the block."""
    cloud.front.on_request.append(fn)
    try:
        yield
    finally:
        cloud.front.on_request.remove(fn)


@pytest.fixture
def interrupts():
    """SIGINT raises KeyboardInterrupt with Python's own handler and SIGTERM raises it too
    (as the command line makes it), whatever the test run inherited (a run started in the
    background of a shell has SIGINT ignored); both handlers are put back afterwards.
    Yields the SIGTERM handler."""
    def as_interrupt(signum, frame):
        raise KeyboardInterrupt

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, as_interrupt)
    try:
        yield as_interrupt
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def interrupt_main_thread(sig=signal.SIGINT):
    # Sent to the main thread itself, so that the call it is blocked in is interrupted
    # there, as a Ctrl-C at the terminal does.
    signal.pthread_kill(threading.main_thread().ident, sig)


def operations(cloud, *names):
    return [q.operation for q in cloud.front.requests if q.operation in names]


def _all_gone(cloud, clients):
    states = {r["Instances"][0]["State"]["Name"] for r in clients.ec2.describe_instances()["Reservations"]}
    assert states <= {"terminated", "shutting-down"}
    assert not cloud.front.volumes, "every volume the verification made was deleted"


def test_cloud_verify_boots_the_published_emi_with_its_eki_and_eri_and_cleans_up(euca_cloud, clients, published):
    with Guest(euca_cloud):
        report = cloud_verify(published, clients)
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
        report = cloud_verify(published, clients, volume_timeout=8)
    r = {c.name: c for c in report.results}
    assert r["volume-hotplug"].status == FAIL and "new 1 GiB disk" in r["volume-hotplug"].summary
    assert published.data["result"] == "failed"
    _all_gone(euca_cloud, clients)


def test_cloud_verify_fails_boots_with_the_console_tail(euca_cloud, clients, published):
    with Guest(euca_cloud, boots=False):
        report = cloud_verify(published, clients, boot_timeout=8)
    boots = report.results[0]
    assert boots.status == FAIL and "Kernel panic" in boots.evidence["console_tail"]
    assert all(c.status == SKIP for c in report.results[1:])
    _all_gone(euca_cloud, clients)


def test_cloud_verify_terminates_the_instance_on_ctrl_c(euca_cloud, clients, published):
    def interrupt(seconds):
        raise KeyboardInterrupt

    (published.dir / "verify.json").write_text(json.dumps({"result": "passed", "checks": []}))
    with pytest.raises(KeyboardInterrupt):
        cloud_verify(published, clients, wait=interrupt)
    _all_gone(euca_cloud, clients)
    # the interrupted run is on record as failed, not the earlier "passed"
    on_disk = json.loads((published.dir / "verify.json").read_text())
    assert on_disk["result"] == "failed" and on_disk["mode"] == "cloud"
    assert on_disk["checks"][-1] == {**on_disk["checks"][-1], "name": "verification", "status": "fail",
                                     "summary": "did not finish: KeyboardInterrupt"}


# --- API errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("not_listed", ["NotFound", "no reservations"])
def test_cloud_verify_waits_while_the_new_instance_is_not_listed_yet(euca_cloud, clients, published, not_listed):
    if not_listed == "NotFound":
        euca_cloud.fail_ec2("DescribeInstances", "InvalidInstanceID.NotFound", times=2,
                            message="The instance ID does not exist")
    else:
        euca_cloud.hide_instances(2)
    with Guest(euca_cloud):
        report = cloud_verify(published, clients, only={"boots"})
    assert report.results[0].status == PASS, report.results[0].summary
    if not_listed == "NotFound":
        describes = [q.status for q in euca_cloud.front.requests if q.operation == "DescribeInstances"]
        assert describes[:3] == [400, 400, 200]
    else:
        assert euca_cloud.front.hidden_describes == 0, "both empty answers were waited through"
    _all_gone(euca_cloud, clients)


@pytest.mark.parametrize("action, code", [("CreateVolume", "VolumeLimitExceeded"), ("AttachVolume", "IncorrectState")])
def test_cloud_verify_fails_the_check_an_api_error_happens_in_and_still_writes_the_report(
        euca_cloud, clients, published, action, code):
    euca_cloud.fail_ec2(action, code, message="refused by the stand-in")
    with Guest(euca_cloud):
        report = cloud_verify(published, clients, volume_timeout=10)
    r = {c.name: c for c in report.results}
    assert r["boots"].status == PASS
    hotplug = r["volume-hotplug"]
    assert hotplug.status == FAIL and hotplug.summary == f"{action} failed: {code}: refused by the stand-in"
    assert hotplug.evidence["api_error"] == code
    saved = json.loads((published.dir / "verify.json").read_text())
    assert saved["result"] == "failed" and published.data["result"] == "failed"
    _all_gone(euca_cloud, clients)


# --- cleanup ---------------------------------------------------------------------------------

def test_cloud_verify_terminates_the_instance_before_it_releases_the_volume(euca_cloud, clients, published):
    front = euca_cloud.front
    state_at_delete = []

    def interrupt_once_attached(seconds):
        if any(v["attached"] is not None for v in front.volumes.values()):
            raise KeyboardInterrupt
        time.sleep(seconds)

    def note(rec):
        if rec.operation == "DeleteVolume":
            terminate = [q for q in front.requests if q.operation == "TerminateInstances"][-1]
            state_at_delete.append(front._instance_state(terminate.params["InstanceId.1"]))

    with Guest(euca_cloud), on_request(euca_cloud, note), pytest.raises(KeyboardInterrupt):
        cloud_verify(published, clients, wait=interrupt_once_attached)
    cleanup = operations(euca_cloud, "TerminateInstances", "DetachVolume", "DeleteVolume")
    assert cleanup[0] == "TerminateInstances" and cleanup[-1] == "DeleteVolume"
    assert state_at_delete == ["terminated"], "the volume is deleted once the instance is gone"
    _all_gone(euca_cloud, clients)


def test_cloud_verify_fails_and_names_a_volume_that_never_becomes_free_to_delete(euca_cloud, clients, published):
    def stick_volumes_at_terminate(rec):
        if rec.operation == "TerminateInstances":
            euca_cloud.stick_volumes()

    try:
        with Guest(euca_cloud), on_request(euca_cloud, stick_volumes_at_terminate):
            report = cloud_verify(published, clients, cleanup_timeout=5)
        r = {c.name: c for c in report.results}
        vid = r["volume-hotplug"].evidence["volume"]
        assert r["boots"].status == PASS and r["volume-hotplug"].status == PASS
        assert not report.ok and r["cleanup"].status == FAIL
        assert vid in r["cleanup"].summary and "remove by hand" in r["cleanup"].summary
        assert "VolumeInUse" in r["cleanup"].evidence["left"][f"volume {vid}"]
        assert f"volume {vid}" in render_table(report)
        assert published.data["result"] == "failed" and "cleanup" in published.data["error"]
        assert operations(euca_cloud, "DeleteVolume")[-1:] == ["DeleteVolume"], "deleting was tried anyway"
    finally:
        euca_cloud.clear_faults()
        for leftover in list(euca_cloud.front.volumes):
            clients.ec2.delete_volume(VolumeId=leftover)
    _all_gone(euca_cloud, clients)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cloud_verify_finishes_cleaning_up_through_a_second_interrupt_then_raises_it(
        euca_cloud, clients, published, sig, interrupts):
    def interrupt_at_terminate(rec):
        if rec.operation == "TerminateInstances":
            interrupt_main_thread(sig)

    with Guest(euca_cloud), on_request(euca_cloud, interrupt_at_terminate), pytest.raises(KeyboardInterrupt):
        cloud_verify(published, clients)
    assert signal.getsignal(signal.SIGTERM) is interrupts
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert operations(euca_cloud, "TerminateInstances", "DeleteVolume") == ["TerminateInstances", "DeleteVolume"]
    _all_gone(euca_cloud, clients)


def test_cloud_verify_finds_and_terminates_the_instance_of_an_interrupted_run_by_its_client_token(
        euca_cloud, clients, published, interrupts):
    front = euca_cloud.front
    before = set(front.instances)

    def interrupt_at_run(rec):
        if rec.operation == "RunInstances" and rec.status == 200:
            interrupt_main_thread()

    with on_request(euca_cloud, interrupt_at_run), pytest.raises(KeyboardInterrupt):
        cloud_verify(published, clients)
    (started,) = set(front.instances) - before
    token = [q for q in front.requests if q.operation == "RunInstances"][-1].params["ClientToken"]
    assert any(q.operation == "DescribeInstances" and q.params.get("Filter.1.Name") == "client-token"
               and q.params.get("Filter.1.Value.1") == token for q in front.requests)
    assert [q.params["InstanceId.1"] for q in front.requests if q.operation == "TerminateInstances"] == [started]
    _all_gone(euca_cloud, clients)


# --- the console log -------------------------------------------------------------------------

def test_cloud_verify_saves_the_console_before_terminating_even_when_boots_fails(euca_cloud, clients, published):
    with Guest(euca_cloud, boots=False):
        report = cloud_verify(published, clients, boot_timeout=8)
    assert report.results[0].status == FAIL
    log = published.dir / "verify-cloud-console.log"
    assert "Kernel panic" in log.read_text() and log.name in report.files
    ops = operations(euca_cloud, "GetConsoleOutput", "TerminateInstances")
    assert ops[-2:] == ["GetConsoleOutput", "TerminateInstances"]
    _all_gone(euca_cloud, clients)


def test_cloud_verify_records_why_the_console_could_not_be_saved(euca_cloud, clients, published):
    euca_cloud.fail_ec2("GetConsoleOutput", "Unsupported", times=None, message="no console on this node")
    with Guest(euca_cloud):
        report = cloud_verify(published, clients, boot_timeout=8)
    boots = report.results[0]
    assert boots.status == FAIL and "GetConsoleOutput failed: Unsupported" in boots.summary
    assert report.info["console_log"] == "not saved: GetConsoleOutput failed: Unsupported: no console on this node"
    assert not (published.dir / "verify-cloud-console.log").exists()
    saved = json.loads((published.dir / "verify.json").read_text())
    assert saved["info"]["console_log"].startswith("not saved")
    _all_gone(euca_cloud, clients)


def test_cloud_verify_needs_a_published_build(tmp_path, clients):
    b = make_build(tmp_path / "output")
    with pytest.raises(BakeError, match="not published"):
        verify(b, cloud=True, clients=clients)
