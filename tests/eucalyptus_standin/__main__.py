"""Serve a stand-in by hand: `cd tests && python -m eucalyptus_standin --version 3`.

Prints the eucarc to source (or pass to `bake publish --eucarc`) and serves until
interrupted."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from . import eucalyptus_standin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eucalyptus_standin", description=__doc__)
    p.add_argument("--version", choices=("3", "4"), default="3", help="Eucalyptus major version to behave as")
    p.add_argument("--dir", type=Path, help="where to write keys and the eucarc (default: a temporary directory)")
    p.add_argument("--state-delay", type=float, default=2.0, help="seconds before instance/volume states change")
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with eucalyptus_standin(args.version, args.dir, state_delay=args.state_delay) as cloud:
        print(f"Eucalyptus {args.version}.x stand-in: EC2 {cloud.ec2_url}  S3 {cloud.s3_url}")
        print(f"source {cloud.eucarc}")
        sys.stdout.flush()
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
