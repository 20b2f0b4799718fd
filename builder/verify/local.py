"""Local verification: boot a build's trio under QEMU and run the checks on it.

One instance (A) carries the checks that need a single running guest (boots, metadata,
user-data, acpiphp, volume-hotplug, the recipe's own checks); a second fresh instance (B)
of the same trio is booted once, for the hygiene check (A and B must differ as machines)
and the sync-agent check (which kills A and restores its root onto B). User data (a script cloud-init runs)
is served only when the user-data check runs, that is when the image has cloud-init.
Evidence (console logs, QEMU messages, QMP events, metadata requests) is kept under
`<build>/verify/`; the node-style disk is kept under `<build>/vm/` (one file per layout)
for the next verification; the key pair, volumes and overlays live in temporary folders
that are removed on every exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.core import lifetime
from builder.core.removal import remove_tree
from builder import vm
from builder.recipe.schemaerrors import size_mib
from . import checks
from .report import Report
from .hygiene import BuildHost, hygiene
from .syncagent import sync_agent
from .result import CheckFailed, CheckResult, CheckSkipped, checking, skipped

WORKDIR = "verify"


@dataclass
class LocalOptions:
    """What a local verification runs and how; `from_recipe` fills it from a recipe's
    `verify` section."""

    user: str = "root"                      # the image's default user (gets the served key)
    instance_type: str = "m1.small"
    boot_timeout: float = 300.0
    hotplug_timeout: float = 30.0
    agent_timeout: float = 600.0
    only: set[str] | None = None            # run only these checks (names as in the report)
    skip: set[str] = field(default_factory=set)
    recipe_checks: list[dict[str, Any]] = field(default_factory=list)
    sync_agent_in_image: bool | None = None  # from the build's elements; None = unknown
    cloud_init_in_image: bool | None = None  # from the build's packages; None = unknown
    cloud_init_timeout: float = 300.0       # user-data: how long cloud-init may take to finish
    free_after_root: int = 0                # bytes of unpartitioned space after partition 1
    append: str = ""                        # extra kernel command line
    serve_key: bool = True                  # serve the verification key from the metadata service
    overlap_instances: bool = True          # sync-agent: boot b during a's first backup (two QEMUs)
    accel: vm.Accel | None = None           # None = probe

    @classmethod
    def from_recipe(cls, section: dict[str, Any] | None, *, user: str, build: Build | None = None,
                    **overrides: Any) -> "LocalOptions":
        section = dict(section or {})
        opts = cls(user=user or "root",
                   instance_type=section.get("instance_type", "m1.small"),
                   boot_timeout=float(section.get("timeout", 300)),
                   cloud_init_timeout=float(section.get("timeout", 300)),
                   skip=set(section.get("skip") or ()),
                   recipe_checks=list(section.get("checks") or ()))
        if section.get("free_after_root"):
            # the schema's size syntax, validated with the recipe
            opts.free_after_root = int((size_mib(section["free_after_root"]) or 0) * vm.disk.MiB)
        if build is not None and build.data.get("elements") is not None:
            names = {e["name"] if isinstance(e, dict) else str(e) for e in build.data["elements"]}
            opts.sync_agent_in_image = "sync-agent" in names
        if build is not None and build.data.get("packages") is not None:
            opts.cloud_init_in_image = any(isinstance(p, dict) and p.get("name") == "cloud-init"
                                           for p in build.data["packages"])
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts

    def wants(self, name: str) -> bool:
        if name in self.skip:
            return False
        return self.only is None or name in self.only

    def lists_user_data(self) -> bool:
        """Whether the report has a user-data check: wanted, and the image has cloud-init
        or the check was asked for by name (it then fails on an image without it)."""
        asked = self.only is not None and "user-data" in self.only
        return self.wants("user-data") and (self.cloud_init_in_image is True or asked)

    def serves_user_data(self) -> bool:
        """Whether the instances get user data: only when the user-data check runs in
        the guest (an image not known to lack cloud-init); otherwise `user-data` stays a
        404, as for an instance run without any."""
        return self.lists_user_data() and self.cloud_init_in_image is not False


def check_names(opts: LocalOptions) -> list[str]:
    """The checks a verification with `opts` reports on, in order."""
    recipe = [f"recipe:{c['name']}" for c in opts.recipe_checks]
    user_data = ["user-data"] if opts.lists_user_data() else []
    names = ["boots", "metadata", *user_data, "acpiphp", "volume-hotplug", *recipe, "hygiene", "sync-agent"]
    return [n for n in names if opts.wants(n)]


class Session:
    """One local verification of one build (see `verify_local`)."""

    def __init__(self, build: Build, opts: LocalOptions, stack: contextlib.ExitStack, trio: vm.Trio):
        self.build = build
        self.opts = opts
        self.stack = stack
        self.trio = trio
        self.b: vm.Instance | None = None
        self.workdir = build.dir / WORKDIR
        self.scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".scratch-", dir=self.workdir)))
        stack.enter_context(lifetime.tracked("path", self.scratch, what="verification scratch folder"))
        self.key, self.public_key = vm.make_keypair(self.scratch)
        self.accel = opts.accel or vm.choose_accel(self.trio.kernel, self.trio.ramdisk)
        # the user data served, and the token its script writes (checked by user-data)
        self.user_data_token = secrets.token_hex(16) if opts.serves_user_data() else None
        self.user_data = checks.user_data_script(self.user_data_token) if self.user_data_token else None
        itype = vm.instance_type(opts.instance_type)
        free = opts.free_after_root
        layout = f"image, {-(-free // vm.disk.MiB)} MiB free, ephemeral ext3, swap" if free > 0 \
            else "image, ephemeral ext3, swap"
        with step(f"Assembling the {itype.name} disk (MBR: {layout})"):
            self.base = vm.node_disk(self.trio.image, build.dir / "vm" / vm.disk.node_disk_name(itype, free), itype,
                                     free_after_root=free)

    def second(self) -> vm.Instance:
        """Instance b, a second fresh instance of the trio: started on first call, up until
        the session ends."""
        if self.b is None:
            self.b = self.boot("b")
        return self.b

    def boot(self, name: str, stack: contextlib.ExitStack | None = None) -> vm.Instance:
        """Start instance `name`; it stays up until `stack` (default: the session's) closes."""
        return (stack or self.stack).enter_context(vm.launch(
            self.trio, self.base, self.workdir, name=name, accel=self.accel,
            instance_type=self.opts.instance_type,
            ssh_public_key=self.public_key if self.opts.serve_key else None,
            ssh_key=self.key, ssh_user=self.opts.user, append=self.opts.append, user_data=self.user_data))


def _prepare_workdir(build: Build) -> Path:
    work = build.dir / WORKDIR
    if work.exists():
        remove_tree(work)
    work.mkdir()
    return work


def verify_local(build: Build, opts: LocalOptions, report: Report | None = None) -> Report:
    """Run the local checks on `build` and return the report (not yet written), filling
    `report` when given, so that a caller still has what was found if this raises."""
    # before the evidence of an earlier verification is cleared for this one
    trio = vm.Trio(**build.require_outputs("kernel", "ramdisk", "image"))
    report = report if report is not None else Report("local")
    results: list[CheckResult] = report.results
    start = time.monotonic()
    work = _prepare_workdir(build)
    report.begun = True
    try:
        with contextlib.ExitStack() as stack:
            s = Session(build, opts, stack, trio)
            report.info.update(accelerator=s.accel.name, accelerator_reason=s.accel.reason,
                               instance_type=opts.instance_type, user=opts.user,
                               kernel_append=opts.append or None)
            if opts.free_after_root > 0:
                report.info["free_after_root"] = opts.free_after_root
            _run_checks(s, results, report)
    finally:
        report.seconds = time.monotonic() - start
        report.files = {p.relative_to(build.dir).as_posix(): "evidence" for p in sorted(work.rglob("*"))
                        if p.is_file()}
    return report


def _run_checks(s: Session, results: list[CheckResult], report: Report) -> None:
    opts = s.opts
    with step(f"Booting instance a ({s.accel.name.upper()}, {opts.instance_type})"):
        a = s.boot("a")
    report.info["instance_id"] = a.instance_id
    booted = True
    with checking("boots", results) as r:
        try:
            checks.boots(a, r, timeout=opts.boot_timeout)
        except BaseException:
            booted = False
            raise
    if not opts.wants("boots") and results[-1].status == "pass":
        results.pop()  # boots always runs (everything needs it); a pass is reported only when asked

    channel = booted
    if opts.wants("metadata") or not booted:
        with checking("metadata", results) as r:
            if not booted:
                raise CheckSkipped("the instance did not boot")
            try:
                checks.metadata(a, r, public_key=s.public_key if opts.serve_key else None, user=opts.user)
            except BaseException:
                channel = False
                raise
        if not opts.wants("metadata") and results[-1].status == "pass":
            results.pop()
    elif opts.serve_key:
        try:
            checks.guest_ssh(a).wait(timeout=60)
        except BakeError:
            channel = False
    else:
        channel = False

    why = "the instance did not boot" if not booted else "no SSH channel to the guest (see metadata)"
    if opts.lists_user_data():
        if opts.cloud_init_in_image is False:
            # asked for by name: nothing in the image would run user data
            with checking("user-data", results):
                raise CheckFailed("the image has no cloud-init (it is not among the build's packages): "
                                  "nothing in it runs user data")
        elif not channel:
            skipped("user-data", why, results)
        else:
            assert s.user_data_token is not None  # served whenever the image's cloud-init may run it
            with step("Check user-data (cloud-init runs the served script)"), checking("user-data", results) as r:
                checks.user_data(a, r, token=s.user_data_token, timeout=opts.cloud_init_timeout)

    def recipe_check(spec):
        def run(r):
            r.evidence["defined_in"] = "recipe"
            checks.recipe_check(a, r, spec)
        return run

    guest_checks = [("acpiphp", lambda r: checks.acpiphp(a, r)),
                    ("volume-hotplug", lambda r: checks.volume_hotplug(a, r, scratch=s.scratch,
                                                                       timeout=opts.hotplug_timeout))]
    guest_checks += [(f"recipe:{spec['name']}", recipe_check(spec)) for spec in opts.recipe_checks]
    for name, fn in guest_checks:
        if not opts.wants(name):
            continue
        if not channel:
            skipped(name, why, results)
            continue
        with step(f"Check {name}"), checking(name, results) as r:
            fn(r)

    if opts.wants("hygiene"):
        if not channel:
            skipped("hygiene", why, results)
        else:
            with step("Check hygiene (a second instance b, and what a has of the build host)"), \
                    checking("hygiene", results) as r:
                hygiene(a, s.second, r, host=BuildHost.of(s.build), timeout=opts.boot_timeout)

    if opts.wants("sync-agent"):
        explicit = opts.only is not None and "sync-agent" in opts.only
        if opts.sync_agent_in_image is False:
            # asked for by name, a check of an agent the image does not have fails: the
            # image cannot bring a dead instance back, whatever the guest could show
            without = "the image was baked without the sync-agent element"
            if explicit:
                with checking("sync-agent", results):
                    raise CheckFailed(without)
            else:
                skipped("sync-agent", without, results)
        elif not channel:
            skipped("sync-agent", why, results)
        else:
            with step("Check sync-agent (backup on a, kill a, restore on b)"), checking("sync-agent", results) as r:
                sync_agent(s, a, r, timeout=opts.agent_timeout)
