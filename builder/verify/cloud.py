"""Cloud verification: run the published EMI (with its EKI and ERI) on the cloud it was
published to, and check what the API and the console show.

    boots           the instance reaches `running` and its console shows the image's
                    end-of-boot line (`bake-ready ...`)
    acpiphp         the console shows the kernel's ACPI hot-plug driver, not disabled
    volume-hotplug  a volume created and attached after boot reaches `attached`, and the
                    guest's kernel reports a new disk of its size on the console; the
                    detach completes

Checks that need a shell in the guest (metadata, sync-agent, the recipe's) are reported
as skipped with the reason. An API error inside a check fails that check. The console is
saved to verify-cloud-console.log while the instance still exists; then the instance is
terminated and, once it is gone, the volume deleted, on success, failure and Ctrl-C
(SIGINT and SIGTERM wait until that is done, which is bounded: see `_Cloud.release`).
What could not be cleaned up fails the report as the "cleanup" check. Clients come from
builder.cloud (the only package that speaks to the cloud's API library).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

# builder.cloud is the one package that imports the API library; its calls module
# carries the error types and the rule for what may have reached the cloud.
from ..cloud.calls import BotoCoreError, ClientError, error_code, retryable
from ..cloud.clients import make_clients
from ..cloud.credentials import load_credentials
from builder.core import interrupts
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from .report import Report
from .result import FAIL, CheckFailed, CheckResult, CheckSkipped, checking, skipped
from .result import event as result_event

log = logging.getLogger("bake.verify")

READY = re.compile(r"bake-ready first_boot=(yes|no) instance_id=(\S*) uptime=([\d.]+)")
ACPIPHP = re.compile(r"acpiphp: .*(Hot Plug PCI Controller Driver|Slot \[)")
NEEDS_SHELL = "cloud mode checks what the API and the console show; this check needs a shell in the guest"
CONSOLE_LOG = "verify-cloud-console.log"
API_ERRORS = (ClientError, BotoCoreError)


@dataclass
class CloudOptions:
    user: str = "root"
    instance_type: str = "m1.small"
    boot_timeout: float = 300.0
    volume_timeout: float = 120.0
    cleanup_timeout: float = 600.0      # for the instance to be terminated and the volume released
    poll_seconds: float = 3.0
    volume_gib: int = 1
    device: str = "/dev/vdb"            # Eucalyptus accepts it on 3.x and 4.x
    only: set[str] | None = None
    skip: set[str] = field(default_factory=set)
    recipe_checks: list[dict[str, Any]] = field(default_factory=list)
    clients: Any = None                 # builder.cloud.clients.Clients; made from credentials when None
    eucarc: str | None = None
    publish_section: dict[str, Any] = field(default_factory=dict)
    wait: Callable[[float], None] = time.sleep   # between API polls during the checks (not cleanup)

    @classmethod
    def from_recipe(cls, section: dict[str, Any] | None, *, user: str, only: set[str] | None = None,
                    **overrides: Any) -> "CloudOptions":
        section = dict(section or {})
        opts = cls(user=user or "root", instance_type=section.get("instance_type", "m1.small"),
                   boot_timeout=float(section.get("timeout", 300)), only=only,
                   skip=set(section.get("skip") or ()), recipe_checks=list(section.get("checks") or ()))
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts

    def wants(self, name: str) -> bool:
        return name not in self.skip and (self.only is None or name in self.only)


def _code(e: Exception) -> str:
    return error_code(e) if isinstance(e, ClientError) else type(e).__name__


def _api_error(e: Exception) -> str:
    """"Code: message" of a failed API call."""
    msg = (e.response.get("Error", {}).get("Message") or "") if isinstance(e, ClientError) else str(e)
    return f"{_code(e)}{': ' + msg if msg else ''}"


def _action(operation: str) -> str:
    return "".join(w.title() for w in operation.split("_"))


class TimedOut(CheckFailed):
    """A poll ran out of time; `last` is the value it saw last (None: not listed)."""

    def __init__(self, waiting_for: str, timeout: float, last: Any, shown: str):
        self.waiting_for = f"timed out after {timeout:.0f} s waiting for {waiting_for}"
        self.last = last
        super().__init__(f"{self.waiting_for} (last seen: {shown})")

    def with_console_tail(self) -> CheckFailed:
        """For a wait on the console: the failure with the console's last lines as evidence."""
        return CheckFailed(self.waiting_for, console_tail="\n".join(str(self.last or "").splitlines()[-40:]))


class _Cloud:
    """The instance and volume this verification made, how to wait on them, and how to
    get rid of them."""

    def __init__(self, ec2, opts: CloudOptions):
        self.ec2 = ec2
        self.opts = opts
        self.instance_id: str | None = None
        self.volume_id: str | None = None
        self.client_token: str | None = None
        self.launch_unsure = False      # RunInstances was sent and may have started an instance we have no id of
        self.cleanup: list[str] = []    # what release() did, for the report's info
        self.leaks: dict[str, str] = {}  # what release() could not get rid of → why

    def call(self, operation: str, **params: Any) -> Any:
        """`ec2.<operation>(**params)`; an API error fails the check (CheckFailed naming the call)."""
        try:
            return getattr(self.ec2, operation)(**params)
        except API_ERRORS as e:
            raise CheckFailed(f"{_action(operation)} failed: {_api_error(e)}", api_error=_code(e)) from None

    def poll(self, fetch: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float, what: str,
             show: Callable[[Any], str] = str, sleep: Callable[[float], None] | None = None) -> Any:
        """Call `fetch` until `done(value)`, every poll_seconds, for at most `timeout` s.
        An API error fails the check (CheckFailed); running out of time raises TimedOut."""
        sleep = sleep or self.opts.wait
        deadline = time.monotonic() + timeout
        while True:
            try:
                last = fetch()
            except API_ERRORS as e:
                raise CheckFailed(f"{what}: {_api_error(e)}", api_error=_code(e)) from None
            if done(last):
                return last
            if time.monotonic() >= deadline:
                raise TimedOut(what, timeout, last, "not listed" if last is None else show(last))
            sleep(min(self.opts.poll_seconds, max(0.0, deadline - time.monotonic())))

    def instance(self) -> dict | None:
        """The instance as DescribeInstances shows it; None while the cloud does not list it
        (just after RunInstances, or once it is gone)."""
        try:
            r = self.ec2.describe_instances(InstanceIds=[self.instance_id])
        except ClientError as e:
            if error_code(e) == "InvalidInstanceID.NotFound":
                return None
            raise
        found = [i for res in r.get("Reservations") or () for i in res.get("Instances") or ()
                 if i.get("InstanceId") == self.instance_id]
        return found[0] if found else None

    def console(self) -> str:
        return self.call("get_console_output", InstanceId=self.instance_id).get("Output") or ""

    def volume(self) -> dict | None:
        """The volume as DescribeVolumes shows it; None while the cloud does not list it."""
        try:
            found = self.ec2.describe_volumes(VolumeIds=[self.volume_id]).get("Volumes") or []
        except ClientError as e:
            if error_code(e) == "InvalidVolume.NotFound":
                return None
            raise
        return found[0] if found else None

    # --- cleanup -------------------------------------------------------------------------

    def release(self) -> None:
        """Terminate the instance (found by its client token if RunInstances never
        answered), wait until it is terminated, then detach and delete the volume. Never
        raises for the cloud's errors: what is left behind goes to `leaks`.

        Bounded: every wait here, the search by client token included, ends at
        cleanup_timeout (600 s by default) after the start; past it only calls already
        sent finish (each within the client's connect and read timeouts), and the
        terminate and delete requests are still sent once."""
        deadline = time.monotonic() + self.opts.cleanup_timeout
        if self.instance_id is None and self.launch_unsure:
            self._find_launched(deadline)
        if self.instance_id:
            self._terminate(deadline)
        if self.volume_id:
            self._delete_volume(deadline)

    def _leak(self, what: str, why: str) -> None:
        self.leaks[what] = why
        self.cleanup.append(f"{what} left behind: {why}")
        log.error("%s was not cleaned up (%s): remove it by hand", what, why)

    def _wait(self, fetch, done, deadline: float, what: str, show: Callable[[Any], str]) -> str | None:
        """Poll until `done`; the reason it did not get there, or None."""
        try:
            self.poll(fetch, done, timeout=max(0.0, deadline - time.monotonic()), what=what, show=show,
                      sleep=time.sleep)
        except CheckFailed as e:
            return e.reason
        return None

    def _find_launched(self, deadline: float) -> None:
        """Look the instance up by our client token: at most three DescribeInstances,
        poll_seconds apart (6 s of waiting with the default 3 s), never waiting past
        `deadline`. Not found by then: nothing was started."""
        token = self.client_token
        for attempt in range(3):
            try:
                try:
                    r = self.ec2.describe_instances(Filters=[{"Name": "client-token", "Values": [token]}])
                except API_ERRORS:
                    r = self.ec2.describe_instances()   # a cloud without the filter
            except API_ERRORS as e:
                self._leak(f"the instance with client token {token}", f"cannot look it up: {_api_error(e)}")
                return
            # Matched here too: a cloud that ignores a filter it does not know lists every instance.
            ids = [i["InstanceId"] for res in r.get("Reservations") or () for i in res.get("Instances") or ()
                   if i.get("ClientToken") == token]
            if ids:
                self.instance_id = ids[0]
                self.cleanup.append(f"found {ids[0]} by its client token")
                return
            left = deadline - time.monotonic()
            if attempt == 2 or left <= 0:
                break
            time.sleep(min(self.opts.poll_seconds, left))   # the cloud may not list a new instance at once
        self.cleanup.append(f"no instance has client token {token}: none was started")

    def _terminate(self, deadline: float) -> None:
        iid = self.instance_id
        try:
            self.ec2.terminate_instances(InstanceIds=[iid])
        except API_ERRORS as e:
            if _code(e) == "InvalidInstanceID.NotFound":
                self.cleanup.append(f"{iid} was gone already")
            else:
                self._leak(f"instance {iid}", f"TerminateInstances: {_api_error(e)}")
            return
        self.cleanup.append(f"terminated {iid}")
        why = self._wait(self.instance, lambda i: i is None or i["State"]["Name"] == "terminated", deadline,
                         f"instance {iid} to be terminated", lambda i: i["State"]["Name"])
        if why:
            self._leak(f"instance {iid}", why)

    def _delete_volume(self, deadline: float) -> None:
        vid = self.volume_id
        try:
            v = self.volume()
            if v and v.get("Attachments"):
                args = {"InstanceId": self.instance_id} if self.instance_id else {}
                self.ec2.detach_volume(VolumeId=vid, Force=True, **args)
                self.cleanup.append(f"detached {vid}")
        except API_ERRORS as e:
            # The terminated instance lets go of the volume anyway; the wait below shows it.
            self.cleanup.append(f"detach {vid}: {_api_error(e)}")
        why = self._wait(self.volume, lambda v: v is None or v["State"] == "available", deadline,
                         f"volume {vid} to be released", lambda v: v["State"])
        # Deleting is tried even after a failed wait: the volume may have become free since.
        try:
            self.ec2.delete_volume(VolumeId=vid)
        except API_ERRORS as e:
            if _code(e) == "InvalidVolume.NotFound":
                self.cleanup.append(f"{vid} was gone already")
            else:
                self._leak(f"volume {vid}", f"DeleteVolume: {_api_error(e)}" + (f", after {why}" if why else ""))
            return
        self.cleanup.append(f"deleted {vid}")


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then raise KeyboardInterrupt if
    one came; the previous handlers are restored. Only the main thread can set handlers
    (and is the one Python delivers signals to); elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame):
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; the default is closest.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if caught:
        raise KeyboardInterrupt


def _clients(build: Build, opts: CloudOptions):
    if opts.clients is not None:
        return opts.clients
    creds = load_credentials(opts.publish_section, eucarc=opts.eucarc)
    if creds is None:
        raise BakeError("no cloud configured for --cloud: source an eucarc, or set EC2_URL, S3_URL, "
                        "EC2_ACCESS_KEY and EC2_SECRET_KEY")
    return make_clients(creds)


def verify_cloud(build: Build, opts: CloudOptions, report: Report | None = None) -> Report:
    """Run the cloud checks on `build`'s published images; the report is not yet written
    (`report`, when given, is filled, so that a caller still has it if this raises).
    The instance and volume are always released, and a Ctrl-C (or SIGTERM) during that
    is held until it is done, then raised."""
    section = build.data.get("cloud") or {}
    image_id = section.get("image_id")
    if not image_id:
        raise BakeError(f"{build.dir}: this build was not published (no image id in build.json's cloud section); "
                        "run `bake publish` first")
    report = report if report is not None else Report("cloud")
    report.info.update(image_id=image_id, kernel_id=section.get("kernel_id"), ramdisk_id=section.get("ramdisk_id"),
                       instance_type=opts.instance_type, ec2_url=section.get("ec2_url"))
    start = time.monotonic()
    cloud = _Cloud(_clients(build, opts).ec2, opts)
    report.begun = True
    try:
        _run(cloud, section, opts, report.results, report)
    finally:
        # after an interrupt, the process's bound would cut this short: what is on the
        # cloud costs until it is gone, so the cleanup gets its own deadline
        interrupts.extend(opts.cleanup_timeout + 60)
        with _interrupts_held():
            try:
                if cloud.instance_id:
                    _save_console(build, cloud, report)
            finally:
                with step("Terminating the instance and deleting the volume"):
                    cloud.release()
                report.info["cleanup"] = cloud.cleanup
                if cloud.leaks:
                    report.results.append(CheckResult(
                        "cleanup", FAIL, 0.0, f"left on the cloud, remove by hand: {', '.join(cloud.leaks)}",
                        {"left": dict(cloud.leaks),
                         "detail": "\n".join(f"{what}: {why}" for what, why in cloud.leaks.items())}))
                    result_event(report.results[-1])
                report.seconds = time.monotonic() - start
    return report


def _save_console(build: Build, cloud: _Cloud, report: Report) -> None:
    # Saved before the instance is terminated: afterwards the cloud may have nothing to show.
    path = build.dir / CONSOLE_LOG
    try:
        path.write_text(cloud.console())
    except (CheckFailed, OSError) as e:
        report.info["console_log"] = f"not saved: {e.reason if isinstance(e, CheckFailed) else e}"
        return
    report.files[path.name] = "the instance's console output"


def _run(cloud: _Cloud, section: dict, opts: CloudOptions, results: list[CheckResult], report: Report) -> None:
    booted = False
    with checking("boots", results) as r:
        t0 = time.monotonic()
        _launch(cloud, section, opts)
        report.info["instance_id"] = cloud.instance_id
        inst = cloud.poll(cloud.instance,
                          lambda i: i is not None and i["State"]["Name"] in ("running", "terminated", "shutting-down"),
                          timeout=opts.boot_timeout, what=f"instance {cloud.instance_id} to be running",
                          show=lambda i: i["State"]["Name"])
        if inst["State"]["Name"] != "running":
            raise CheckFailed(f"instance {cloud.instance_id} went to {inst['State']['Name']} instead of running",
                              state_reason=inst.get("StateReason"))
        r.evidence["running_seconds"] = round(time.monotonic() - t0, 1)
        report.info["availability_zone"] = (inst.get("Placement") or {}).get("AvailabilityZone")
        left = max(1.0, opts.boot_timeout - (time.monotonic() - t0))
        try:
            out = cloud.poll(cloud.console, lambda c: READY.search(c) is not None, timeout=left,
                             what=f"the end-of-boot line 'bake-ready' on {cloud.instance_id}'s console",
                             show=lambda c: f"{len(c)} characters of console")
        except TimedOut as e:
            raise e.with_console_tail() from None
        m = READY.search(out)
        assert m is not None  # what the poll above waited for
        r.evidence.update(ready_line=m.group(0), boot_to_ready_seconds=round(time.monotonic() - t0, 1))
        r.summary = f"{cloud.instance_id} running, ready in {time.monotonic() - t0:.0f} s: {m.group(0)}"
        booted = True

    for name in ("metadata",):
        if opts.wants(name):
            skipped(name, NEEDS_SHELL if booted else "the instance did not boot", results)
    if opts.wants("acpiphp"):
        with checking("acpiphp", results) as r:
            if not booted:
                raise CheckSkipped("the instance did not boot")
            lines = [line.strip() for line in cloud.console().splitlines() if "acpiphp" in line]
            r.evidence["console"] = lines[-3:]
            if any("disabled by user" in line for line in lines):
                raise CheckFailed("the kernel says acpiphp is disabled: attached volumes will not appear", **r.evidence)
            if not any(ACPIPHP.search(line) for line in lines):
                raise CheckSkipped("the console does not show whether acpiphp is loaded (quiet kernel?)")
            r.summary = "the console shows the ACPI PCI hot-plug driver: " + lines[-1][:80]
    if opts.wants("volume-hotplug"):
        with checking("volume-hotplug", results) as r:
            if not booted:
                raise CheckSkipped("the instance did not boot")
            _volume_hotplug(cloud, opts, r, report)
    for spec in opts.recipe_checks:
        if opts.wants(f"recipe:{spec['name']}"):
            skipped(f"recipe:{spec['name']}", NEEDS_SHELL if booted else "the instance did not boot", results)
    for name in ("hygiene", "sync-agent"):
        if opts.wants(name):
            skipped(name, NEEDS_SHELL if booted else "the instance did not boot", results)


def _launch(cloud: _Cloud, section: dict, opts: CloudOptions) -> None:
    # Our own client token lets cleanup find the instance if RunInstances started it but
    # its answer never came (Ctrl-C, a dropped connection).
    cloud.client_token = uuid.uuid4().hex
    args = {"ImageId": section["image_id"], "MinCount": 1, "MaxCount": 1, "InstanceType": opts.instance_type,
            "ClientToken": cloud.client_token}
    if section.get("kernel_id"):
        args["KernelId"] = section["kernel_id"]
    if section.get("ramdisk_id"):
        args["RamdiskId"] = section["ramdisk_id"]
    with step(f"Running {section['image_id']} ({opts.instance_type})"):
        cloud.launch_unsure = True
        try:
            reply = cloud.ec2.run_instances(**args)
        except API_ERRORS as e:
            # A refusal started nothing; a server error or a lost answer may have.
            cloud.launch_unsure = not (isinstance(e, ClientError) and not retryable(e))
            raise CheckFailed(f"RunInstances refused {section['image_id']}: {_api_error(e)}",
                              api_error=_code(e)) from None
    instances = reply.get("Instances") or []
    if not instances or not instances[0].get("InstanceId"):
        raise CheckFailed(f"RunInstances answered without an instance for {section['image_id']}")
    cloud.instance_id = instances[0]["InstanceId"]
    cloud.launch_unsure = False


def _volume_hotplug(cloud: _Cloud, opts: CloudOptions, r: CheckResult, report: Report) -> None:
    zone = report.info.get("availability_zone")
    if not zone:
        raise CheckFailed(f"DescribeInstances does not say which availability zone {cloud.instance_id} is in "
                          "(no Placement.AvailabilityZone), so no volume can be created beside it")
    size = opts.volume_gib << 30
    disk_line = re.compile(rf"\[(vd[a-z]+|sd[a-z]+)\] {size // 512} 512-byte logical blocks")
    vol = cloud.call("create_volume", Size=opts.volume_gib, AvailabilityZone=zone)
    cloud.volume_id = vol["VolumeId"]
    r.evidence["volume"] = cloud.volume_id
    cloud.poll(cloud.volume, lambda v: v is not None and v["State"] == "available", timeout=opts.volume_timeout,
               what=f"volume {cloud.volume_id} to be available", show=lambda v: v["State"])
    before = len(disk_line.findall(cloud.console()))
    t0 = time.monotonic()
    cloud.call("attach_volume", VolumeId=cloud.volume_id, InstanceId=cloud.instance_id, Device=opts.device)
    cloud.poll(cloud.volume,
               lambda v: v is not None and any(a.get("State") == "attached" for a in v.get("Attachments") or ()),
               timeout=opts.volume_timeout, what=f"volume {cloud.volume_id} to be attached",
               show=lambda v: f"{v['State']}, attachments {[a.get('State') for a in v.get('Attachments') or ()]}")
    r.evidence["attached_seconds"] = round(time.monotonic() - t0, 1)
    try:
        out = cloud.poll(cloud.console, lambda c: len(disk_line.findall(c)) > before, timeout=opts.volume_timeout,
                         what=f"the guest's kernel to report a new {opts.volume_gib} GiB disk on the console")
    except TimedOut as e:
        raise e.with_console_tail() from None
    name = disk_line.findall(out)[-1]
    r.evidence.update(guest_device=name, seconds_to_appear=round(time.monotonic() - t0, 1))
    cloud.call("detach_volume", VolumeId=cloud.volume_id, InstanceId=cloud.instance_id)
    cloud.poll(cloud.volume, lambda v: v is not None and v["State"] == "available", timeout=opts.volume_timeout,
               what=f"volume {cloud.volume_id} to be detached", show=lambda v: v["State"])
    r.summary = f"{cloud.volume_id} attached as {opts.device}, seen by the guest as /dev/{name}; detached"
