"""What the image must not carry of the build host or of an instance, as named operations.

Each operation is a short POSIX shell script run inside the image (a Lucid guest has
dash and no python) at the end of customizing, after every element's finalise.d hook,
on both routes. A recipe switches one off by name (`scrub: {skip: [NAME]}`); build.json
records which ran and which were skipped. `OPERATIONS` is the one list; the recipe
schema's enum and the README name the same operations (tests keep them equal), and the
schema's description of `scrub` (so docs/recipe-reference.md) says what each does.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.core.errors import BakeError
from builder.core.log import step
from builder.customize.backend import Backend, tail

# Shell histories and other per-user traces, in root's home and every home in /etc/passwd.
HISTORIES = (".bash_history", ".sh_history", ".ash_history", ".zsh_history", ".history", ".python_history",
             ".lesshst", ".viminfo", ".mysql_history", ".psql_history", ".sqlite_history",
             ".node_repl_history", ".wget-hsts")


@dataclass(frozen=True)
class Operation:
    name: str
    what: str       # what it removes or resets, for the docs and `bake plan`
    script: str     # POSIX shell, run in the image with `set -eu`


OPERATIONS: tuple[Operation, ...] = (
    Operation("apt-sources", "the apt sources name the image's archive (`image_mirror`), not the one the build "
              "fetched from (BAKE_MIRROR, a proxy, the build host's own source)",
              'printf "%s" "$BAKE_IMAGE_APT_SOURCES" > /etc/apt/sources.list'),
    Operation("apt-cache", "apt's package lists, its caches and downloaded .deb files",
              "if command -v apt-get >/dev/null; then apt-get clean; fi\n"
              "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin\n"
              "if [ -d /var/lib/apt ]; then mkdir -p /var/lib/apt/lists/partial; fi"),
    Operation("ssh-hostkeys", "the SSH host keys (each instance makes its own at first boot)",
              "rm -f /etc/ssh/ssh_host_*"),
    Operation("machine-id", "the machine id (empty: systemd makes one at first boot) and D-Bus's copy",
              "if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi\nrm -f /var/lib/dbus/machine-id"),
    Operation("bake-state", "bake's first-boot marks (first boot done, booted, instance id)",
              "rm -f /var/lib/bake/firstboot-done /var/lib/bake/booted /var/lib/bake/instance-id"),
    Operation("cloud-init-state", "cloud-init's instance state (all of /var/lib/cloud but its seed) and its logs",
              "if [ -d /var/lib/cloud ]; then\n"
              "  for e in /var/lib/cloud/* /var/lib/cloud/.[!.]*; do\n"
              '    [ -e "$e" ] || [ -L "$e" ] || continue\n'
              '    [ "$e" = /var/lib/cloud/seed ] || rm -rf "$e"\n'
              "  done\n"
              "fi\n"
              "rm -f /var/log/cloud-init.log /var/log/cloud-init-output.log"),
    Operation("shell-history", "shell and tool histories of root and of every user with a home",
              'for h in /root $(cut -d: -f6 /etc/passwd | sort -u); do\n'
              '  case "$h" in /|/root|/home/*) ;; *) continue ;; esac\n'
              '  [ -d "$h" ] || continue\n'
              f'  for f in {" ".join(HISTORIES)}; do rm -f "$h/$f"; done\n'
              "done"),
    Operation("dhcp-leases", "DHCP leases of earlier boots",
              "rm -f /var/lib/dhcp/*.leases /var/lib/dhcp/*.lease /var/lib/dhcp3/*.leases "
              "/var/lib/dhclient/*.leases /var/lib/NetworkManager/*.lease"),
    Operation("random-seed", "the saved random seed (every instance would start from the same one)",
              "rm -f /var/lib/systemd/random-seed /var/lib/urandom/random-seed"),
    Operation("udev-persistent-net", "udev's remembered network cards (a new instance's NIC would not be eth0)",
              "rm -f /etc/udev/rules.d/70-persistent-net.rules /etc/udev/rules.d/70-persistent-cd.rules"),
    Operation("crash-data", "crash reports and core dumps",
              "rm -rf /var/crash/* /var/lib/systemd/coredump/*"),
    Operation("logfiles", "log files emptied, rotated logs and the journal removed",
              "if [ -d /var/log ]; then\n"
              "  rm -rf /var/log/journal/*\n"
              "  find /var/log -type f \\( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \\) -exec rm -f {} +\n"
              "  find /var/log -type f -exec truncate -s 0 {} +\n"
              "fi"),
    # /tmp/bake is bake's own, removed by the customizer right after the scrub: the
    # elements' copy and, on the appliance route, the folder this very command writes its
    # output to
    Operation("tmp-files", "everything in /tmp and /var/tmp",
              "for d in /tmp /var/tmp; do\n"
              '  if [ -d "$d" ]; then find "$d" -mindepth 1 -maxdepth 1 ! -path /tmp/bake -exec rm -rf {} +; fi\n'
              "done"),
)

NAMES = tuple(op.name for op in OPERATIONS)


def chosen(skip: list[str] | tuple[str, ...], *, sources: bool) -> tuple[list[Operation], dict[str, str]]:
    """The operations to run (all but the recipe's `scrub.skip`), and why each other one
    does not: skipped by the recipe, or, for apt-sources, not `sources` (the route wrote
    no apt sources: the image keeps its own)."""
    unknown = [n for n in skip if n not in NAMES]
    if unknown:  # the schema's enum refuses them first; this guards callers that bypass it
        raise BakeError(f"scrub.skip: no operation named {', '.join(unknown)} (there are: {', '.join(NAMES)})")
    why = {n: "skipped by the recipe" for n in NAMES if n in skip}
    if not sources and "apt-sources" not in why:
        why["apt-sources"] = "the image's own sources are kept (this route fetched no packages)"
    return [op for op in OPERATIONS if op.name not in why], why


MARK = "bake-scrub:"


def script(operations: list[Operation]) -> str:
    """One POSIX shell script running `operations` in order, each in a subshell of its
    own with `set -eu`, after a line naming it; the first that fails ends the script with
    its exit status. One command in the image, not one per operation: each command run
    in a tree is a confined process of its own, which costs more than the work here."""
    parts = []
    for op in operations:
        parts.append(f"echo '{MARK} {op.name}'\n(\nset -eu\n{op.script}\n)\n"
                     "rc=$?; if [ $rc -ne 0 ]; then exit $rc; fi\n")
    return "".join(parts)


def scrub(backend: Backend, operations: list[Operation], env: dict[str, str]) -> list[str]:
    """Run `operations` in the image through `backend`, in order; returns their names.
    A failed one is a BakeError naming it, with its output's tail."""
    if not operations:
        return []
    with step(f"Scrubbing ({len(operations)} operations)"):
        r = backend.run(["/bin/sh", "-c", script(operations)], env=env, what="the scrub", quiet=True)
    if r.returncode != 0:
        lines = r.output.splitlines()
        marks = [i for i, line in enumerate(lines) if line.startswith(MARK + " ")]
        name = lines[marks[-1]].split(None, 1)[1] if marks else operations[0].name
        said = "\n".join(lines[marks[-1] + 1:] if marks else lines)
        raise BakeError(f"scrub operation {name} failed in {backend.where} (exit {r.returncode})\n"
                        f"--- last lines of its output ---\n{tail(said)}")
    return [op.name for op in operations]
