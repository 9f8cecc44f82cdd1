"""A stop signal during blocking setup is never lost, even when Python loses its exception.

Python runs a signal handler between two bytecodes of the main thread; when those are a
__del__'s (every subprocess.Popen has one), the handler's KeyboardInterrupt is printed as
"Exception ignored" and dropped. CI met it: SIGTERM to `demo` while it built its sandbox
did nothing. Each case runs in a child Python, which sends the signal to itself from inside
a __del__ so that the handler runs there, every time.

Then the whole `mirrord-ns run` start, signal by signal and phase by phase (the phases that
MIRRORD_NS_TIMING=1 prints), against an agent that never answers: always a quiet 130.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest

from conftest import INSTALLED, MIRRORD_NS, key_pair

CHILD = textwrap.dedent("""
    import os, signal, sys
    from mirrord_tun.interrupts import Interrupts

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))  # the handler runs here, inside __del__

    def steps(check):
        Finalized()
        print("went on", flush=True)
        check()
        print("started the command", flush=True)

    try:
        if sys.argv[1] == "plain":  # what demo did: a handler that only raises
            def interrupt(_sig, _frame):
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, interrupt)
            steps(lambda: None)
        else:
            with Interrupts((signal.SIGTERM,)) as stop:
                steps(stop.check)
    except KeyboardInterrupt:
        print("cleaned up", flush=True)
""")


def _child(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=30)


def test_a_plain_raising_handler_loses_the_signal_in_a_finalizer() -> None:
    """The failure itself, so that the test below is known to meet it."""
    r = _child("plain")
    assert r.stdout.split() == ["went", "on", "started", "the", "command"]
    assert "Exception ignored" in r.stderr and "KeyboardInterrupt" in r.stderr


def test_the_lost_interrupt_is_raised_again_at_the_next_step_and_not_printed() -> None:
    r = _child("interrupts")
    assert r.stdout.splitlines() == ["went on", "cleaned up"]
    assert r.stderr == ""


def test_a_second_signal_cannot_cut_the_cleanup_short() -> None:
    code = textwrap.dedent("""
        import os, signal, time
        from mirrord_tun.interrupts import Interrupts
        try:
            with Interrupts((signal.SIGTERM, signal.SIGHUP)):
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                finally:  # the cleanup
                    os.kill(os.getpid(), signal.SIGHUP)
                    print("cleaned up", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "cleaned up\ninterrupted\n", "")


# --- a stop signal at each moment of `run`'s start

@pytest.fixture(scope="module")
def silent_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """`run`'s options toward an agent that takes the connection and never says a word (its
    kernel completes the handshake; nothing accepts): run waits there until stopped."""
    identity, host = key_pair(tmp_path_factory.mktemp("keys"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield ["--agent", "127.0.0.1:%d" % listener.getsockname()[1], "--identity", identity,
               "--agent-host-key", host]


# The phases `MIRRORD_NS_TIMING=1` names, in order: the signal is sent as the line arrives, so it
# lands in what follows: cli's imports, option parsing (the mirror's imports), reading the keys
# and starting the event loop, the SSH connection.
PHASES = ["interpreter started", "command line imported", "options parsed", "keys read"]


@pytest.mark.parametrize("argv0", [INSTALLED, MIRRORD_NS], ids=["installed", "python -m"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_at_any_moment_of_the_start_is_a_quiet_130(silent_agent: list[str], sig: signal.Signals,
                                                                  argv0: list[str]) -> None:
    """A Ctrl-C during the imports printed a KeyboardInterrupt traceback, a SIGTERM or SIGHUP
    there killed run by the signal, and one just before the event loop ran left Python's
    "coroutine ... was never awaited" warnings: each is one quiet exit with 130."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_", "MIRRORD_NS_"))}
    for phase in PHASES:
        p = subprocess.Popen([*argv0, "run", *silent_agent, "--", "true"], stderr=subprocess.PIPE, text=True,
                             env={**env, "MIRRORD_NS_TIMING": "1"}, restore_signals=True)
        try:
            seen = []
            assert p.stderr is not None
            for line in p.stderr:
                seen.append(line)
                if line.startswith(f"mirrord-ns: timing: {phase}:"):
                    p.send_signal(sig)
                    break
            rest = p.stderr.read()
            code = p.wait(30)
        finally:
            p.kill()
            p.wait()
        told = [line for line in rest.splitlines() if line.strip() and not line.startswith("mirrord-ns: timing: ")]
        assert (code, told) == (130, []), (phase, "".join(seen) + rest)
