"""A Eucalyptus 3.x/4.x stand-in for the tests: a real HTTP server on 127.0.0.1 that
answers at Eucalyptus' service paths, checks signatures and parameters the way the
cloud does, and keeps moto's EC2 and S3 backends behind it.

    with eucalyptus_standin("3", tmp_path) as cloud:
        cloud.ec2_url, cloud.s3_url          # http://127.0.0.1:PORT/services/...
        cloud.eucarc                         # an eucarc naming the keys below
        cloud.identity.access_key / .secret_key / .account_id
        cloud.identity.user_key / .user_cert / .cloud_cert / .cloud_key   (paths)
        cloud.env()                          # EC2_URL, S3_URL, EC2_ACCESS_KEY, ... as a dict
        cloud.front.requests                 # every request answered (RequestRecord)
        cloud.fail_puts(after=2)             # object PUTs fail once two succeeded
        cloud.fail_ec2("CreateVolume", "VolumeLimitExceeded")   # the next CreateVolume is refused
        cloud.hide_instances(2)              # the next two DescribeInstances list nothing
        cloud.stick_volumes()                # the volumes there are now stay in-use
        cloud.front.console_output[iid] = "..."   # what GetConsoleOutput returns
        cloud.remove_leftovers()             # faults undone, instances terminated, volumes deleted

Pytest fixtures: `tests/eucalyptus_standin/fixtures.py` (euca3, euca4, euca_cloud).

S3 bucket names are one namespace across stand-ins running in the same process (as
they are across accounts on a real cloud); EC2 state is kept per stand-in.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from werkzeug.serving import WSGIRequestHandler, make_server

from .keys import TestIdentity
from .server import Ec2Fault, Front, PutFault, RequestRecord

__all__ = ["Standin", "eucalyptus_standin", "RequestRecord", "TestIdentity"]


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive and `Expect: 100-continue`, as clients expect

    def log_request(self, *args, **kwargs) -> None:  # the front keeps its own record
        pass


@dataclass
class Standin:
    """A running stand-in cloud (see the module docstring)."""

    version: str
    front: Front
    identity: TestIdentity
    host: str
    port: int
    eucarc: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ec2_url(self) -> str:
        return self.base_url + self.front.ec2_paths[0]

    @property
    def s3_url(self) -> str:
        return self.base_url + self.front.s3_paths[0]

    def env(self) -> dict[str, str]:
        """The environment variables `source eucarc` would set."""
        i = self.identity
        return {"EC2_URL": self.ec2_url, "S3_URL": self.s3_url, "EC2_ACCESS_KEY": i.access_key,
                "EC2_SECRET_KEY": i.secret_key, "AWS_ACCESS_KEY": i.access_key, "AWS_SECRET_KEY": i.secret_key,
                "EC2_CERT": str(i.user_cert), "EC2_PRIVATE_KEY": str(i.user_key),
                "EUCALYPTUS_CERT": str(i.cloud_cert), "EC2_USER_ID": i.account_id,
                "EC2_ACCOUNT_NUMBER": i.account_id}

    def fail_puts(self, after: int, match: str = r"\.part\.", status: int = 503, times: int | None = None) -> None:
        """Let `after` object PUTs whose key matches `match` succeed, then fail the next
        `times` of them (all of them when None)."""
        self.front.put_faults.append(PutFault(re.compile(match), after, status, times))

    def fail_ec2(self, action: str, code: str, *, times: int | None = 1, message: str = "injected failure",
                 status: int = 400) -> None:
        """Answer the next `times` calls of EC2 `action` (all of them when None) with error
        `code`, before the call does anything."""
        self.front.ec2_faults.append(Ec2Fault(action, code, message, status, times))

    def hide_instances(self, times: int) -> None:
        """Answer the next `times` DescribeInstances calls with no reservations, as a cloud
        may just after RunInstances."""
        self.front.hidden_describes = times

    def stick_volumes(self) -> None:
        """Keep every volume that exists now `in-use` (attached) from now on, whatever is
        asked: detaching does nothing and DeleteVolume refuses it."""
        self.front.stuck_volumes.update(self.front.volumes)

    def clear_faults(self) -> None:
        """Undo every injected fault: failing PUTs and EC2 calls, hidden instances, stuck volumes."""
        self.front.put_faults.clear()
        self.front.ec2_faults.clear()
        self.front.hidden_describes = 0
        self.front.stuck_volumes.clear()

    def remove_leftovers(self) -> list[str]:
        """Undo every fault, terminate every instance not terminated yet and delete every
        volume, as the cloud's administrator would (no signature, no state checks), so
        that what one test left behind is not in the way of the next. Returns the ids
        it removed."""
        self.clear_faults()
        front, removed = self.front, []
        with front._lock:
            running = [iid for iid, rec in front.instances.items() if rec["terminated"] is None]
            volumes = list(front.volumes)
        for iid in running:
            front._ec2_TerminateInstances({"Action": "TerminateInstances", "InstanceId.1": iid})
            removed.append(iid)
        for vid in volumes:
            # moto cannot detach a volume attached to nothing (it looks the instance up by
            # None); such a volume has nothing to detach
            with contextlib.suppress(Exception):
                front._ec2_forward({"Action": "DetachVolume", "VolumeId": vid, "Force": "true"})
            front._ec2_forward({"Action": "DeleteVolume", "VolumeId": vid})
            with front._lock:
                front.volumes.pop(vid, None)
            removed.append(vid)
        return removed

    def puts(self, match: str = "") -> list[str]:
        """Paths of the successful object PUTs so far whose path matches `match`."""
        return [r.path for r in self.front.requests
                if r.service == "s3" and r.method == "PUT" and r.status == 200 and r.path.count("/") >= 2
                and re.search(match, r.path)]

    def clear_log(self) -> None:
        self.front.requests.clear()


@contextlib.contextmanager
def eucalyptus_standin(version: str = "3", directory: Path | None = None, *,
                       state_delay: float = 1.0) -> Iterator[Standin]:
    """Serve a stand-in Eucalyptus `version` ("3" or "4") on 127.0.0.1 (a free port) for
    the duration of the block. Keys, certificates and the eucarc go into `directory`
    (a temporary one when None)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="euca-standin-")))
        identity = TestIdentity.create(Path(directory) / f"euca{version}-credentials")
        front = Front(version, identity, state_delay=state_delay)
        server = make_server("127.0.0.1", 0, front, threaded=True, request_handler=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name=f"euca{version}-standin", daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            standin = Standin(version, front, identity, "127.0.0.1", port, Path())
            standin.eucarc = identity.write_eucarc(standin.ec2_url, standin.s3_url)
            yield standin
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
