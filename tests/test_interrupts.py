"""A stop signal during blocking setup is never lost, even when Python loses its exception.

Python runs a signal handler between two bytecodes of the main thread; when those are a
__del__'s (every subprocess.Popen has one), the handler's KeyboardInterrupt is printed as
"Exception ignored" and dropped. CI met it: SIGTERM to `demo` while it built its sandbox
did nothing. Each case runs in a child Python, which sends the signal to itself from inside
a __del__ so that the handler runs there, every time.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

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
