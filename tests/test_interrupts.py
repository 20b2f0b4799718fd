"""SIGINT and SIGTERM: handled even when inherited ignored, cleanup is never cut short by
a second one, and the process ends within the bound however long cleanup would take."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from events import wait_for


def child(tmp_path, body: str, *, ignore_sigint: bool = False) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from pathlib import Path
        from builder.core import interrupts
        tmp = Path(%r)
    """ % (str(REPO), str(tmp_path))) + textwrap.dedent(body))
    # SIG_IGN survives exec: the child starts with SIGINT ignored, as a background job does
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=pre)


@pytest.fixture
def children():
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_sigint_inherited_ignored_still_interrupts(tmp_path, children):
    p = child(tmp_path, """
        interrupts.install()
        try:
            (tmp / "ready").touch()
            time.sleep(600)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """, ignore_sigint=True)
    children.append(p)
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, 60, "the child to start")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "interrupted\n", err


def test_a_second_signal_during_cleanup_is_held_until_the_cleanup_is_done(tmp_path, children):
    p = child(tmp_path, """
        interrupts.install()
        try:
            (tmp / "ready").touch()
            time.sleep(600)
        except KeyboardInterrupt:
            with interrupts.deferred():
                (tmp / "cleaning").touch()
                while not (tmp / "second-sent").exists():
                    time.sleep(0.05)
                time.sleep(0.5)           # the second signal's handler has run by now
                print("cleanup finished", flush=True)
            sys.exit(130)
    """)
    children.append(p)
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, 60, "the child to start")
    p.send_signal(signal.SIGINT)
    wait_for(lambda: (tmp_path / "cleaning").exists() or p.poll() is not None, 60, "the cleanup to start")
    p.send_signal(signal.SIGTERM)
    (tmp_path / "second-sent").touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "cleanup finished\n", err
    assert "SIGTERM: still cleaning up after the interrupt" in err


def test_a_signal_inside_a_cleanup_step_interrupts_once_the_step_is_done(tmp_path, children):
    p = child(tmp_path, """
        interrupts.install()
        try:
            with interrupts.deferred():
                (tmp / "in-step").touch()
                while not (tmp / "sent").exists():
                    time.sleep(0.05)
                time.sleep(0.5)
                print("step done", flush=True)
            print("not reached", flush=True)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    children.append(p)
    wait_for(lambda: (tmp_path / "in-step").exists() or p.poll() is not None, 60, "the step to start")
    p.send_signal(signal.SIGINT)
    (tmp_path / "sent").touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "step done\n", err


def test_a_cleanup_that_overruns_the_bound_is_ended_with_status_130(tmp_path, children):
    p = child(tmp_path, """
        interrupts.BOUND = 2
        interrupts.install()
        try:
            (tmp / "ready").touch()
            time.sleep(600)
        except KeyboardInterrupt:
            with interrupts.deferred():
                time.sleep(600)           # a cleanup that would never end
    """)
    children.append(p)
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, 60, "the child to start")
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "cleanup did not finish within the bound" in err
    assert time.monotonic() - sent < 60, "ended by the bound, not by the 600 s cleanup"


def blocked_signals(pid: int, tid: int) -> set[int]:
    for line in open(f"/proc/{pid}/task/{tid}/status"):
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigBlk line for thread {tid} of {pid}")


def test_only_the_main_thread_can_receive_sigint_and_sigterm(tmp_path, children):
    # The kernel hands a process-wide signal to any thread that does not block it; one
    # handled on another thread leaves the main thread asleep in its wait.
    p = child(tmp_path, """
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from builder.core import sh
        interrupts.install()
        gate = threading.Event()
        threading.Thread(target=gate.wait, daemon=True).start()
        pool = ThreadPoolExecutor(2)
        pool.submit(gate.wait)
        pool.submit(gate.wait)
        try:
            sh.run(["sh", "-c", "touch %s/ready; exec sleep 600" % tmp])
        except KeyboardInterrupt:
            gate.set()
            print("interrupted", flush=True)
            sys.exit(130)
    """)
    children.append(p)
    wait_for(lambda: (tmp_path / "ready").exists() or p.poll() is not None, 60, "the command to start")

    def others() -> list[int]:
        return [int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]

    # the command can write its file before the output reader's thread has started (seen
    # on a busy box): wait for the reader and the three others
    wait_for(lambda: len(others()) >= 4 or p.poll() is not None, 60,
             "the child's output reader and three more threads")
    assert p.poll() is None, p.communicate()
    assert not blocked_signals(p.pid, p.pid) & {signal.SIGINT, signal.SIGTERM}
    for t in others():
        assert {signal.SIGINT, signal.SIGTERM} <= blocked_signals(p.pid, t), f"thread {t} can receive them"
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "interrupted\n", err


def test_a_signal_handled_on_another_thread_still_wakes_a_waiting_command(tmp_path, children):
    # A thread that did not come through `threading.Thread.start` (a C library's) takes
    # the signal itself; the main thread, waiting for a command, must still act on it.
    p = child(tmp_path, """
        import _thread, signal, threading
        from builder.core import sh
        interrupts.install()
        def hit():
            while not (tmp / "ready").exists():
                time.sleep(0.05)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        _thread.start_new_thread(hit, ())
        try:
            sh.run(["sh", "-c", "echo $$ > %s/pid.tmp; mv %s/pid.tmp %s/ready; exec sleep 600" % (tmp, tmp, tmp)])
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """)
    children.append(p)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "interrupted\n", err
    sleeper = int((tmp_path / "ready").read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{sleeper}"), 30, "the command's process to end")
