"""The channel host-side checks use to run commands in a guest: SSH with a key pair made
for one verification and served to the guest by the metadata service.

The key is RSA so that old guests (Lucid's OpenSSH 5.3) accept it; the client is told to
offer `ssh-rsa` signatures for the same reason. Host keys are not recorded anywhere.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.core import sh
from builder.core.errors import BakeError
from builder.core.sh import CommandError


def make_keypair(directory: Path, name: str = "verify-key") -> tuple[Path, str]:
    """Generate a fresh key pair in `directory`; (private key path, public key line)."""
    sh.require("ssh-keygen", "ssh")
    key = Path(directory) / name
    sh.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-C", "bake-verify", "-f", key],
           what="generating the verification key pair", quiet=True)
    return key, key.with_suffix(".pub").read_text().strip()


class GuestCommandError(BakeError):
    """A command run in the guest failed or the guest could not be reached."""

    def __init__(self, message: str, result: sh.Result | None = None):
        self.result = result
        super().__init__(message)


@dataclass
class SSH:
    """Run commands in a guest as `user` over the host-forwarded port."""

    port: int
    user: str
    key: Path
    host: str = "127.0.0.1"
    # One login held open (an SSH master connection) that later commands share: under
    # emulation a fresh login (key exchange, PAM, a user session) costs seconds.
    control: Path | None = None
    _master: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _master_up: bool = field(default=False, repr=False)

    def _options(self, connect_timeout: int = 10) -> list[str]:
        return ["-F", "/dev/null", "-i", str(self.key), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-o", "PubkeyAcceptedAlgorithms=+ssh-rsa", "-o", "HostKeyAlgorithms=+ssh-rsa"]

    def argv(self, command: str, connect_timeout: int = 10) -> list[str]:
        shared = ["-o", f"ControlPath={self.control}", "-o", "ControlMaster=no"] if self.control else []
        # without a live master at ControlPath, ssh simply logs in on its own
        return ["ssh", *self._options(connect_timeout), *shared, f"{self.user}@{self.host}", command]

    def _start_master(self) -> None:
        if self.control is None or self._master_up:
            return
        self._master_up = True
        self._master.enter_context(sh.background(
            ["ssh", *self._options(), "-o", f"ControlPath={self.control}", "-o", "ControlMaster=yes",
             "-o", "ControlPersist=no", "-N", f"{self.user}@{self.host}"], grace=1))

    def drop_master(self) -> None:
        """End the shared connection (before the guest reboots; the next `wait` makes a new one)."""
        self._master.close()
        self._master_up = False
        if self.control is not None:
            self.control.unlink(missing_ok=True)

    close = drop_master

    def run(self, command: str, *, timeout: float = 60, check: bool = True, input: bytes | None = None) -> sh.Result:
        """Run `command` (a shell command line, in the guest's shell) and return its result;
        `input` is fed to its stdin.

        With `check`, a non-zero exit raises GuestCommandError carrying the output."""
        try:
            r = sh.run(self.argv(command), check=False, timeout=timeout, what=f"in the guest: {command}",
                       input=input)
        except CommandError as e:
            raise GuestCommandError(str(e)) from None
        if r.returncode == 255:
            raise GuestCommandError(f"could not reach the guest over SSH as {self.user}: {r.output.strip()}", r)
        if check and r.returncode != 0:
            raise GuestCommandError(f"in the guest: {command!r} exited {r.returncode}: {r.output.strip()[-2000:]}", r)
        return r

    def wait(self, *, timeout: float, what: str = "SSH to accept the verification key") -> sh.Result:
        """Connect until a trivial command succeeds (called once the guest said it is ready,
        so this normally succeeds on the first attempt)."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestCommandError(f"timed out after {timeout:.0f} s waiting for {what}: {last}")
            try:
                r = sh.run(self.argv("true", connect_timeout=max(1, int(min(10, left)))), check=False,
                           timeout=min(left, 20) + 1, what="SSH probe", quiet=True)
            except CommandError as e:
                last = str(e).splitlines()[0]
                continue
            if r.returncode == 0:
                self._start_master()
                return r
            last = r.output.strip().splitlines()[-1] if r.output.strip() else f"exit {r.returncode}"
            if "Permission denied" in r.output:
                raise GuestCommandError(f"the guest refused the verification key for {self.user}: {last}", r)
            # the user-mode network accepts the connection itself and resets it when the
            # guest's sshd is not listening yet, so failures are immediate: retry at a
            # measured pace rather than spinning
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
