"""Cloud verification: run the published EMI (with its EKI and ERI) on the cloud it was
published to, and check what the API and the console show.

    boots           the instance reaches `running` and its console shows the image's
                    end-of-boot line (`bake-ready ...`)
    acpiphp         the console shows the kernel's ACPI hot-plug driver, not disabled
    volume-hotplug  a volume created and attached after boot reaches `attached`, and the
                    guest's kernel reports a new disk of its size on the console; the
                    detach completes

Checks that need a shell in the guest (metadata, sync-agent, the recipe's) are reported
as skipped with the reason. The instance is always terminated and the volume always
deleted, on success, failure and Ctrl-C. Clients come from builder.cloud (the only
package that speaks to the cloud's API library).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..build import Build
from ..errors import BakeError
from ..log import step
from .report import Report
from .result import CheckFailed, CheckResult, checking, skipped

READY = re.compile(r"bake-ready first_boot=(yes|no) instance_id=(\S*) uptime=([\d.]+)")
ACPIPHP = re.compile(r"acpiphp: .*(Hot Plug PCI Controller Driver|Slot \[)")
NEEDS_SHELL = "cloud mode checks what the API and the console show; this check needs a shell in the guest"


@dataclass
class CloudOptions:
    user: str = "root"
    instance_type: str = "m1.small"
    boot_timeout: float = 300.0
    volume_timeout: float = 120.0
    poll_seconds: float = 3.0
    volume_gib: int = 1
    device: str = "/dev/vdb"            # Eucalyptus accepts it on 3.x and 4.x
    only: set[str] | None = None
    skip: set[str] = field(default_factory=set)
    recipe_checks: list[dict[str, Any]] = field(default_factory=list)
    clients: Any = None                 # builder.cloud.clients.Clients; made from credentials when None
    eucarc: str | None = None
    publish_section: dict[str, Any] = field(default_factory=dict)
    wait: Callable[[float], None] = time.sleep   # between API polls (tests pass a faster one)

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
    return str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", type(e).__name__))


class _Cloud:
    """The instance and volume this verification made, and how to wait on them."""

    def __init__(self, ec2, opts: CloudOptions):
        self.ec2 = ec2
        self.opts = opts
        self.instance_id: str | None = None
        self.volume_id: str | None = None
        self.cleanup: list[str] = []

    def poll(self, fetch: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float, what: str) -> Any:
        """Call `fetch` until `done(value)`, every poll_seconds, for at most `timeout` s."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = fetch()
            if done(last):
                return last
            if time.monotonic() >= deadline:
                raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what} (last seen: {last})")
            self.opts.wait(min(self.opts.poll_seconds, max(0.0, deadline - time.monotonic())))

    def instance(self) -> dict:
        r = self.ec2.describe_instances(InstanceIds=[self.instance_id])
        return r["Reservations"][0]["Instances"][0]

    def console(self) -> str:
        return self.ec2.get_console_output(InstanceId=self.instance_id).get("Output") or ""

    def volume(self) -> dict:
        return self.ec2.describe_volumes(VolumeIds=[self.volume_id])["Volumes"][0]

    def release(self) -> None:
        """Terminate the instance and delete the volume, whatever state they are in."""
        if self.volume_id:
            try:
                if self.volume().get("Attachments"):
                    self.ec2.detach_volume(VolumeId=self.volume_id, InstanceId=self.instance_id, Force=True)
            except Exception as e:
                self.cleanup.append(f"detach {self.volume_id}: {_code(e)}")
        if self.instance_id:
            try:
                self.ec2.terminate_instances(InstanceIds=[self.instance_id])
                self.cleanup.append(f"terminated {self.instance_id}")
            except Exception as e:
                self.cleanup.append(f"terminate {self.instance_id} failed: {_code(e)}")
        if self.volume_id:
            try:
                self.poll(self.volume, lambda v: v["State"] == "available", timeout=self.opts.volume_timeout,
                          what=f"volume {self.volume_id} to be released")
                self.ec2.delete_volume(VolumeId=self.volume_id)
                self.cleanup.append(f"deleted {self.volume_id}")
            except Exception as e:
                self.cleanup.append(f"delete {self.volume_id} failed: {e}")


def _clients(build: Build, opts: CloudOptions):
    if opts.clients is not None:
        return opts.clients
    from ..cloud.clients import make_clients
    from ..cloud.credentials import load_credentials

    creds = load_credentials(opts.publish_section, eucarc=opts.eucarc)
    if creds is None:
        raise BakeError("no cloud configured for --cloud: source an eucarc, or set EC2_URL, S3_URL, "
                        "EC2_ACCESS_KEY and EC2_SECRET_KEY")
    return make_clients(creds)


def verify_cloud(build: Build, opts: CloudOptions) -> Report:
    """Run the cloud checks on `build`'s published images; the report is not yet written."""
    section = build.data.get("cloud") or {}
    image_id = section.get("image_id")
    if not image_id:
        raise BakeError(f"{build.dir}: this build was not published (no image id in build.json's cloud section); "
                        "run `bake publish` first")
    report = Report("cloud")
    report.info.update(image_id=image_id, kernel_id=section.get("kernel_id"), ramdisk_id=section.get("ramdisk_id"),
                       instance_type=opts.instance_type, ec2_url=section.get("ec2_url"))
    start = time.monotonic()
    cloud = _Cloud(_clients(build, opts).ec2, opts)
    results = report.results
    try:
        _run(cloud, section, opts, results, report)
    finally:
        with step("Terminating the instance and deleting the volume"):
            cloud.release()
        report.info["cleanup"] = cloud.cleanup
        report.seconds = time.monotonic() - start
        console = build.dir / "verify-cloud-console.log"
        if cloud.instance_id:
            try:
                console.write_text(cloud.console())
                report.files[console.name] = "the instance's console output"
            except Exception:
                pass
    return report


def _run(cloud: _Cloud, section: dict, opts: CloudOptions, results: list[CheckResult], report: Report) -> None:
    booted = False
    with checking("boots", results) as r:
        args = {"ImageId": section["image_id"], "MinCount": 1, "MaxCount": 1, "InstanceType": opts.instance_type}
        if section.get("kernel_id"):
            args["KernelId"] = section["kernel_id"]
        if section.get("ramdisk_id"):
            args["RamdiskId"] = section["ramdisk_id"]
        t0 = time.monotonic()
        with step(f"Running {section['image_id']} ({opts.instance_type})"):
            try:
                inst = cloud.ec2.run_instances(**args)["Instances"][0]
            except Exception as e:
                raise CheckFailed(f"RunInstances refused {section['image_id']}: {_code(e)}: {e}") from None
        cloud.instance_id = inst["InstanceId"]
        report.info["instance_id"] = cloud.instance_id
        inst = cloud.poll(cloud.instance, lambda i: i["State"]["Name"] in ("running", "terminated", "shutting-down"),
                          timeout=opts.boot_timeout, what=f"instance {cloud.instance_id} to be running")
        if inst["State"]["Name"] != "running":
            raise CheckFailed(f"instance {cloud.instance_id} went to {inst['State']['Name']} instead of running",
                              state_reason=inst.get("StateReason"))
        r.evidence["running_seconds"] = round(time.monotonic() - t0, 1)
        report.info["availability_zone"] = inst.get("Placement", {}).get("AvailabilityZone")
        left = max(1.0, opts.boot_timeout - (time.monotonic() - t0))
        try:
            out = cloud.poll(cloud.console, lambda c: READY.search(c) is not None, timeout=left,
                             what=f"the end-of-boot line 'bake-ready' on {cloud.instance_id}'s console")
        except CheckFailed as e:
            raise CheckFailed(e.reason.split(" (last seen")[0], console_tail="\n".join(cloud.console().splitlines()[-40:])) from None
        m = READY.search(out)
        r.evidence.update(ready_line=m.group(0), boot_to_ready_seconds=round(time.monotonic() - t0, 1))
        r.summary = f"{cloud.instance_id} running, ready in {time.monotonic() - t0:.0f} s: {m.group(0)}"
        booted = True

    for name in ("metadata",):
        if opts.wants(name):
            skipped(name, NEEDS_SHELL if booted else "the instance did not boot", results)
    if opts.wants("acpiphp"):
        with checking("acpiphp", results) as r:
            if not booted:
                raise _skip("the instance did not boot")
            lines = [l.strip() for l in cloud.console().splitlines() if "acpiphp" in l]
            r.evidence["console"] = lines[-3:]
            if any("disabled by user" in l for l in lines):
                raise CheckFailed("the kernel says acpiphp is disabled: attached volumes will not appear", **r.evidence)
            if not any(ACPIPHP.search(l) for l in lines):
                raise _skip("the console does not show whether acpiphp is loaded (quiet kernel?)")
            r.summary = "the console shows the ACPI PCI hot-plug driver: " + lines[-1][:80]
    if opts.wants("volume-hotplug"):
        with checking("volume-hotplug", results) as r:
            if not booted:
                raise _skip("the instance did not boot")
            _volume_hotplug(cloud, opts, r, report)
    for spec in opts.recipe_checks:
        if opts.wants(f"recipe:{spec['name']}"):
            skipped(f"recipe:{spec['name']}", NEEDS_SHELL if booted else "the instance did not boot", results)
    if opts.wants("sync-agent"):
        skipped("sync-agent", NEEDS_SHELL if booted else "the instance did not boot", results)


def _skip(reason: str):
    from .result import CheckSkipped
    return CheckSkipped(reason)


def _volume_hotplug(cloud: _Cloud, opts: CloudOptions, r: CheckResult, report: Report) -> None:
    zone = report.info.get("availability_zone")
    size = opts.volume_gib << 30
    disk_line = re.compile(rf"\[(vd[a-z]+|sd[a-z]+)\] {size // 512} 512-byte logical blocks")
    vol = cloud.ec2.create_volume(Size=opts.volume_gib, AvailabilityZone=zone)
    cloud.volume_id = vol["VolumeId"]
    r.evidence["volume"] = cloud.volume_id
    cloud.poll(cloud.volume, lambda v: v["State"] == "available", timeout=opts.volume_timeout,
               what=f"volume {cloud.volume_id} to be available")
    before = len(disk_line.findall(cloud.console()))
    t0 = time.monotonic()
    cloud.ec2.attach_volume(VolumeId=cloud.volume_id, InstanceId=cloud.instance_id, Device=opts.device)
    cloud.poll(cloud.volume, lambda v: any(a.get("State") == "attached" for a in v.get("Attachments", [])),
               timeout=opts.volume_timeout, what=f"volume {cloud.volume_id} to be attached")
    r.evidence["attached_seconds"] = round(time.monotonic() - t0, 1)
    out = cloud.poll(cloud.console, lambda c: len(disk_line.findall(c)) > before, timeout=opts.volume_timeout,
                     what=f"the guest's kernel to report a new {opts.volume_gib} GiB disk on the console")
    name = disk_line.findall(out)[-1]
    r.evidence.update(guest_device=name, seconds_to_appear=round(time.monotonic() - t0, 1))
    cloud.ec2.detach_volume(VolumeId=cloud.volume_id, InstanceId=cloud.instance_id)
    cloud.poll(cloud.volume, lambda v: v["State"] == "available", timeout=opts.volume_timeout,
               what=f"volume {cloud.volume_id} to be detached")
    r.summary = f"{cloud.volume_id} attached as {opts.device}, seen by the guest as /dev/{name}; detached"
