"""Local instances under QEMU, booted as a Eucalyptus KVM node controller boots them.

Only this package knows QEMU. `launch` boots a build's trio and yields an `Instance`
(serial console, QMP hot-plug and power-off, metadata service, SSH channel);
`accel.choose` decides between KVM and TCG by a probe boot; `disk` assembles the
node-style MBR disk and the per-instance overlays.
"""

from .accel import Accel, choose as choose_accel
from .console import GuestTimeout
from .disk import INSTANCE_TYPES, blank_volume, instance_type, node_disk
from .guest import SSH, GuestCommandError, make_keypair
from .instance import GUEST_IPV4, READY, Instance, Ready, Trio, Volume, launch
from .qmp import QMPFailure

__all__ = [
    "Accel", "choose_accel", "GuestTimeout", "INSTANCE_TYPES", "blank_volume", "instance_type", "node_disk",
    "SSH", "GuestCommandError", "make_keypair", "GUEST_IPV4", "READY", "Instance", "Ready", "Trio", "Volume",
    "launch", "QMPFailure",
]
