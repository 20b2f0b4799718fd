"""The checks a local verification instance runs, each a small function on a running
instance that fills its result or raises CheckFailed / CheckSkipped.

Guest-side commands are POSIX shell (a Lucid guest has dash and no python); waits in the
guest use `udevadm wait` where the guest has it and always carry a timeout.
"""

from __future__ import annotations

import posixpath
import re
import secrets
import shlex
import time
from pathlib import Path

from ..vm import Instance, blank_volume
from ..vm.console import GuestTimeout
from ..vm.guest import SSH, GuestCommandError
from .result import CheckFailed, CheckResult, CheckSkipped

BUILTIN = ("boots", "metadata", "user-data", "acpiphp", "volume-hotplug", "hygiene", "sync-agent")
MiB = 1 << 20
# cloud-init's console lines that bear on a login: which stages ran, its warnings and
# errors, and what it says of users and keys (not its network tables or randomart)
CLOUD_INIT_SAYS = re.compile(r"Cloud-init v\. |\[(WARNING|ERROR|CRITICAL)\]|Traceback|ci-info: .*(?i:key|user|ssh-)"
                             r"|(?i:fail).*cloud-init|cloud-init.*(?i:fail)")


def guest_ssh(inst: Instance) -> SSH:
    """The instance's SSH channel; CheckSkipped when it was started without one."""
    if inst.ssh is None:
        raise CheckSkipped("no SSH channel to the guest")
    return inst.ssh


def boots(inst: Instance, result: CheckResult, *, timeout: float) -> None:
    """The guest reaches userspace and prints its end-of-boot line."""
    try:
        ready = inst.wait_ready(timeout=timeout)
    except GuestTimeout as e:
        raise CheckFailed(str(e).splitlines()[0], console_tail=e.tail,
                          console_log=str(inst.console.path)) from None
    result.evidence.update(boot_to_ready_seconds=ready.seconds, guest_uptime=ready.uptime,
                           first_boot=ready.first_boot, ready_line=ready.line, accelerator=inst.accel.name,
                           kernel_command_line=inst.kernel_command_line)
    result.summary = (f"ready in {ready.seconds:.1f} s under {inst.accel.name.upper()} "
                      f"(guest uptime {ready.uptime:.1f} s)")
    if not ready.first_boot:
        raise CheckFailed("the image says this is not its first boot: it was shipped with state of an earlier boot",
                          **result.evidence)


def metadata(inst: Instance, result: CheckResult, *, public_key: str | None, user: str, timeout: float = 60) -> None:
    """The SSH key served by the metadata service is in the default user's authorized_keys
    (shown by logging in with it, and by reading the file)."""
    requests = inst.metadata_requests()
    result.evidence["metadata_requests"] = [f"{r['method']} {r['path']} {r['status']}" for r in requests]
    fetched = any(r["path"].rstrip("/").endswith("public-keys/0/openssh-key") and r["status"] == 200 for r in requests)
    if not public_key:
        raise CheckFailed("the metadata service served no public key, so none can be installed",
                          **result.evidence)
    ssh = guest_ssh(inst)
    try:
        ssh.wait(timeout=timeout)
    except GuestCommandError as e:
        lines = inst.console.lines()
        said = [line for line in lines if "bake-ec2-metadata" in line][-3:]
        cloud_init = [line.strip() for line in lines
                      if ("cloud-init" in line or "ci-info" in line) and CLOUD_INIT_SAYS.search(line)]
        cloud_init = cloud_init[-15:]
        if cloud_init:
            result.evidence["cloud_init_said"] = cloud_init
        raise CheckFailed(f"cannot log in as {user} with the key served by the metadata service: {e}"
                          + ("" if fetched else " (the guest never fetched public-keys/0/openssh-key)")
                          + ("; cloud-init's console lines are in the evidence" if cloud_init else ""),
                          guest_said=said, **result.evidence) from None
    keys = ssh.run("cat ~/.ssh/authorized_keys", timeout=30).output
    if public_key.split()[1] not in keys:
        raise CheckFailed(f"logged in, but the served key is not in ~{user}/.ssh/authorized_keys", **result.evidence)
    iid = ssh.run("cat /var/lib/bake/instance-id 2>/dev/null || true", timeout=30).output.strip()
    result.evidence.update(user=user, key_fetched=fetched, instance_id_seen=iid or None,
                           instance_id_served=inst.instance_id)
    result.summary = (f"served key found in ~{user}/.ssh/authorized_keys and accepted for login"
                      + (f"; instance-id {iid} as served" if iid == inst.instance_id else ""))


USER_DATA_MARKER = "/var/lib/bake-verify/user-data"
FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
_STATUS = re.compile(r"^status: (?P<status>.+?)\s*$", re.M)
_DATASOURCE = re.compile(r"\bDataSource(?P<name>[A-Za-z0-9]+)")


def user_data_script(token: str, marker: str = USER_DATA_MARKER) -> str:
    """The user data a verification serves: a shell script that writes `token` to
    `marker` (whole or not at all), which only an instance that ran it can hold."""
    folder = posixpath.dirname(marker)
    return ("#!/bin/sh\n"
            "# bake verification: the instance ran the user data it was launched with\n"
            "set -e\n"
            f"mkdir -p {shlex.quote(folder)}\n"
            f"echo {shlex.quote(token)} > {shlex.quote(marker + '.tmp')}\n"
            f"mv {shlex.quote(marker + '.tmp')} {shlex.quote(marker)}\n")


def _cloud_init_status(output: str) -> tuple[str | None, str | None, str]:
    """(status, datasource, text) from `cloud-init status [--wait] --long`: the
    datasource as its class names it (Ec2, Ec2Local, None), the text without the
    progress dots of --wait."""
    text = output.strip().lstrip(".").strip()
    m = _STATUS.search(text)
    ds = _DATASOURCE.search(text)
    return (m["status"] if m else None), (ds["name"] if ds else None), text


def _fingerprints(inst: Instance, timeout: float) -> list[str]:
    """The console's SSH host key fingerprint block (cloud-init's keys-to-console), or []
    when it has not appeared within `timeout` seconds."""
    try:
        inst.console.wait_for(re.escape(FINGERPRINTS_END), timeout=timeout, what="the host key fingerprints")
    except GuestTimeout:
        pass
    block: list[str] = []
    for line in inst.console.lines():
        if FINGERPRINTS_BEGIN in line:
            block = [line.strip()]
        elif block and FINGERPRINTS_END not in block[-1]:
            block.append(line.strip())
    return block


def user_data(inst: Instance, result: CheckResult, *, token: str, timeout: float = 300) -> None:
    """cloud-init ran the user data the metadata service served: it finished (`status:
    done`) within `timeout` seconds, the served script wrote `token` to its marker file,
    and cloud-init printed the SSH host key fingerprints on the console."""
    ssh = guest_ssh(inst)
    wait = max(1, int(timeout))
    t0 = time.monotonic()
    r = ssh.run(f"timeout {wait} cloud-init status --wait --long", timeout=wait + 30, check=False)
    waited = round(time.monotonic() - t0, 1)
    fetched = any(q["path"].split("?")[0].rstrip("/").endswith("/user-data") and q["status"] == 200
                  for q in inst.metadata_requests())
    result.evidence["user_data_fetched"] = fetched
    never = "" if fetched else " (the guest never fetched user-data from the metadata service)"
    if r.returncode == 127 or ("not found" in r.output and "status:" not in r.output):
        raise CheckFailed(f"cloud-init is not installed in the guest: {r.output.strip()[-200:]}", **result.evidence)
    if r.returncode == 124:  # timeout ended the wait: say what it was doing
        r = ssh.run("cloud-init status --long", timeout=60, check=False)
    status, datasource, text = _cloud_init_status(r.output)
    result.evidence.update(cloud_init_status=text, datasource=datasource, seconds_waited=waited)
    if status in ("running", "not run"):
        raise CheckFailed(f"cloud-init had not finished after {wait} s (status: {status})" + never,
                          **result.evidence)
    if status == "error":
        detail = text.split("detail:", 1)[-1].strip().replace("\n", "; ")
        raise CheckFailed(f"cloud-init finished with errors: {detail[:300]}", **result.evidence)
    if status == "disabled":
        raise CheckFailed(f"cloud-init is disabled in the guest: {' '.join(text.split())[:200]}", **result.evidence)
    if status != "done":
        raise CheckFailed(f"cloud-init did not run to the end (status: {status or 'unknown'}): "
                          f"{' '.join(text.split())[:200]}", **result.evidence)
    if datasource == "None":
        raise CheckFailed("cloud-init finished without a datasource (DataSourceNone): it found no metadata "
                          "service, so it never saw the user data" + never, **result.evidence)
    marker = ssh.run(f"cat {USER_DATA_MARKER} 2>/dev/null || true", timeout=30).output.strip()
    result.evidence.update(marker=marker or None, token_served=token)
    if not marker:
        raise CheckFailed(f"cloud-init finished (datasource {datasource}) but the user-data script did not run: "
                          f"{USER_DATA_MARKER} is missing" + never, **result.evidence)
    if marker != token:
        raise CheckFailed(f"{USER_DATA_MARKER} holds {marker[:40]!r}, not the token served to this instance: "
                          "it comes from another run (state baked into the image?)", **result.evidence)
    fingerprints = _fingerprints(inst, timeout=15)
    result.evidence["host_key_fingerprints"] = fingerprints
    if not fingerprints:
        raise CheckFailed("cloud-init finished but printed no SSH host key fingerprints on the console "
                          f"(no '{FINGERPRINTS_BEGIN}' block): its keys-to-console module did not run",
                          **result.evidence)
    keys = [line for line in fingerprints if FINGERPRINTS_BEGIN not in line and FINGERPRINTS_END not in line]
    result.summary = (f"cloud-init done (datasource {datasource}); the user-data script wrote the served token; "
                      f"{len(keys)} host key fingerprint(s) on the console")


ACPIPHP_PROBE = r"""
if [ -d /sys/module/acpiphp ]; then present=yes; else present=no; fi
# a loaded module is listed in /proc/modules; a built-in driver has /sys/module/acpiphp
# (its parameters) but no entry there, and modules.builtin only exists from 2.6.33 on
if grep -q '^acpiphp ' /proc/modules 2>/dev/null; then how=module
elif [ $present = yes ] || grep -q '/acpiphp\.ko' /lib/modules/$(uname -r)/modules.builtin 2>/dev/null; then
    how=built-in
else how=none; fi
disabled=$(cat /sys/module/acpiphp/parameters/disable 2>/dev/null || echo unknown)
echo "present=$present how=$how disabled=$disabled kernel=$(uname -r)"
"""


def acpiphp(inst: Instance, result: CheckResult) -> None:
    """The ACPI PCI hot-plug driver is loaded or built in, and not disabled."""
    out = guest_ssh(inst).run(ACPIPHP_PROBE, timeout=30).output.strip().splitlines()[-1]
    facts = dict(kv.split("=", 1) for kv in out.split())
    result.evidence.update(facts)
    said = [line.strip() for line in inst.console.lines() if "acpiphp" in line]
    if said:
        result.evidence["console"] = said[-3:]
    if facts.get("present") != "yes" or facts.get("how") == "none":
        raise CheckFailed(f"acpiphp is neither loaded nor built into kernel {facts.get('kernel')}: "
                          "hot-plugged volumes will not appear (add the acpiphp element)", **result.evidence)
    if facts.get("disabled") == "Y":
        raise CheckFailed("acpiphp is present but disabled (acpiphp.disable=1): hot-plugged volumes will not appear",
                          **result.evidence)
    result.summary = f"acpiphp {facts['how']} in {facts['kernel']}, enabled"


WAIT_DISK = r"""
serial=$1; size=$2; t=$3
link=/dev/disk/by-id/virtio-$serial
if udevadm wait --help >/dev/null 2>&1; then
    udevadm wait --timeout="$t" "$link" >/dev/null 2>&1
else
    end=$(( $(cut -d. -f1 /proc/uptime) + t ))
    until [ -e "$link" ] || [ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ]; do sleep 0.2; done
fi
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$serial" ] || continue
    [ $(( $(cat "$d/size") * 512 )) = "$size" ] || { echo "wrong-size ${d##*/} $(( $(cat "$d/size") * 512 ))"; exit 2; }
    echo "found ${d##*/}"; exit 0
done
echo "none $(cd /sys/block && echo *)"; exit 1
"""


def wait_for_disk(inst: Instance, serial: str, size: int, timeout: float) -> str:
    """Wait in the guest for a disk with `serial` and `size` bytes; its name (vdb, ...)."""
    cmd = f"sh -c {shlex.quote(WAIT_DISK)} wait-disk {shlex.quote(serial)} {size} {int(timeout)}"
    r = guest_ssh(inst).run(cmd, timeout=timeout + 30, check=False)
    words = r.output.strip().split()
    if r.returncode == 0 and words[:1] == ["found"]:
        return words[1]
    if words[:1] == ["wrong-size"]:
        raise CheckFailed(f"the disk with serial {serial} appeared as {words[1]} with {words[2]} bytes, not {size}")
    raise CheckFailed(f"no disk with serial {serial} and {size} bytes appeared in the guest within {timeout:.0f} s "
                      f"of device_add (block devices seen: {' '.join(words[1:]) or 'none'}); "
                      "is acpiphp loaded in the guest?")


def volume_hotplug(inst: Instance, result: CheckResult, *, scratch: Path, timeout: float = 30) -> None:
    """A volume attached after boot appears in the guest (found by serial and size), and
    a detach completes (the guest releases it)."""
    guest_ssh(inst)
    size = 1024 * MiB + 5 * MiB  # an unusual size, so that no other disk matches it
    serial = f"bakevol{secrets.token_hex(4)}"
    path = blank_volume(scratch / f"{serial}.raw", size)
    try:
        t0 = time.monotonic()
        vol = inst.attach_volume(path, serial=serial)
        name = wait_for_disk(inst, serial, size, timeout)
        appeared = round(time.monotonic() - t0, 2)
        result.evidence.update(volume=vol.id, serial=serial, size=size, guest_device=name,
                               seconds_to_appear=appeared)
        t1 = time.monotonic()
        try:
            inst.detach_volume(vol.id, timeout=timeout)
        except Exception as e:
            raise CheckFailed(f"the volume appeared as /dev/{name} but detaching it failed: {e}",
                              **result.evidence) from None
        gone = guest_ssh(inst).run(f"test ! -e /sys/block/{name} && echo gone || echo present",
                                   timeout=30).output.strip()
        result.evidence.update(seconds_to_detach=round(time.monotonic() - t1, 2), after_detach=gone)
        if gone != "gone":
            raise CheckFailed(f"QEMU released the volume but /dev/{name} is still in the guest", **result.evidence)
        result.summary = (f"appeared as /dev/{name} {appeared:.1f} s after device_add (serial {serial}, "
                          f"{size} bytes); detached")
    finally:
        path.unlink(missing_ok=True)


def recipe_check(inst: Instance, result: CheckResult, spec: dict) -> None:
    """A check from the recipe's verify section: `run` in the guest, exit 0, output
    containing `expect` (when given)."""
    ssh = guest_ssh(inst)
    timeout = float(spec.get("timeout", 60))
    r = ssh.run(spec["run"], timeout=timeout, check=False)
    out = r.output.strip()
    result.evidence.update(command=spec["run"], exit=r.returncode, output=out[-1000:])
    if r.returncode != 0:
        raise CheckFailed(f"`{spec['run']}` exited {r.returncode}: {out[-200:]}", **result.evidence)
    expect = spec.get("expect")
    if expect is not None and expect not in r.output:
        raise CheckFailed(f"`{spec['run']}` did not print {expect!r} (printed: {out[-200:]!r})", **result.evidence)
    result.summary = f"`{spec['run']}` → {out.splitlines()[-1][:80] if out else '(no output)'}"
