"""The baked trio boots under QEMU the way a Eucalyptus KVM node controller boots it:
an MBR disk (partition image, ephemeral ext3, swap), -kernel/-initrd with
`root=/dev/vda1 console=ttyS0`, virtio, 256 MiB (m1.small). KVM is used only where a
probe boot shows it works; the test output says which accelerator ran."""

from __future__ import annotations

import pytest

from builder import vm
from vm_builds import default_user, leftovers, qemu_processes_under, source_build

pytestmark = [pytest.mark.e2e, pytest.mark.bakes, pytest.mark.boots]


def say(request, text: str) -> None:
    """Print past pytest's capture, so the run's output says it (which accelerator ran)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[{request.node.name}] {text}", flush=True)
    request.node.user_properties.append(("note", text))


def test_trio_boots_to_userspace_and_first_boot_marker_on_serial_console(request, tmp_path):
    build = source_build(request)
    trio = vm.Trio.from_build(build)
    accel = vm.choose_accel(trio.kernel, trio.ramdisk)
    say(request, f"accelerator: {accel.name.upper()} ({accel.reason})")
    base = vm.node_disk(trio.image, tmp_path / "disk.raw", vm.instance_type("m1.small"))
    key, pub = vm.make_keypair(tmp_path)
    with vm.launch(trio, base, tmp_path, name="boot", accel=accel, ssh_public_key=pub, ssh_key=key,
                   ssh_user=default_user(build)) as inst:
        ready = inst.wait_ready(timeout=300)
        say(request, f"power-on to ready: {ready.seconds:.1f} s; {ready.line}")
        assert ready.first_boot, ready.line
        assert ready.instance_id == inst.instance_id, "the ready line names the id the metadata service served"
        log = inst.console.lines()
        assert any("Run /init as init process" in l for l in log), "the kernel started the initramfs"
        assert any("systemd[1]" in l or "init:" in l for l in log), "the root filesystem's init ran (userspace)"
        cmdline = inst.ssh.run("cat /proc/cmdline; cat /proc/meminfo | head -1; nproc; "
                               "cat /sys/block/vda/size /sys/block/vda/vda1/size", timeout=60).output.split("\n")
        # the node's command line, plus what the accelerator adds (TCG: norandmaps)
        assert cmdline[0].split() == ["root=/dev/vda1", "console=ttyS0", *accel.kernel_args()]
        mem_kib = int(cmdline[1].split()[1])
        assert 200 * 1024 < mem_kib <= 256 * 1024, "m1.small: 256 MiB"
        assert cmdline[2].strip() == "1"
        assert int(cmdline[3]) * 512 == 5 << 30
        assert int(cmdline[4]) * 512 >= trio.image.stat().st_size
    assert not qemu_processes_under(tmp_path)
    assert not leftovers(tmp_path)
