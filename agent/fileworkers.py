"""Threads for one SSH connection's file service: bounded in number, in requests and in time.

A thread that asks a file system that never answers sleeps in the kernel until it does, and
no thread can be cancelled. So each connection gets threads of its own (at most THREADS), at
most WAITING requests in flight (a request past that is refused at once), and each request
an answer within `timeout` (an SFTP failure past it) whether or not its thread ever comes
back (OSError ETIMEDOUT or EBUSY, which SFTP sends as a failure with its text). One
connection's hung mount then costs it at most THREADS threads; other sessions, a
new `run` and the event loop never wait for it (the loop's own executor is never used). The
threads are daemons, so a hung one never keeps the agent from exiting; a result that comes
back after its request gave up is handed to `discard` (an fd is closed), in that thread.
"""
from __future__ import annotations

import asyncio
import errno
import queue
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")
THREADS = 4  # per connection
WAITING = 32  # requests per connection in flight (asyncssh serves one at a time per channel)
DEFAULT_TIMEOUT = 15.0  # seconds; a healthy read of MAX_READ bytes takes milliseconds


class _Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], args: tuple[Any, ...],
                 discard: Callable[[Any], None] | None, needed: bool) -> None:
        self.loop, self.fn, self.args, self.discard, self.needed = loop, fn, args, discard, needed
        self.future: asyncio.Future[Any] = loop.create_future()
        self.lock = threading.Lock()
        self.abandoned = self.finished = False

    def run(self) -> None:
        with self.lock:
            if self.abandoned and not self.needed:
                return  # given up before it started: never ask the file system
        try:
            result, error = self.fn(*self.args), None
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request as it is
            result, error = None, e
        with self.lock:
            late = self.abandoned
            self.finished = not late
        if late:
            if error is None and self.discard is not None:
                self.discard(result)
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, result, error)
        except RuntimeError:  # the loop is closed: the agent is stopping, nobody waits any more
            pass

    def _deliver(self, result: Any, error: BaseException | None) -> None:
        if not self.future.done():
            self.future.set_exception(error) if error else self.future.set_result(result)
        elif error is None and self.discard is not None:  # its request was cancelled meanwhile
            # Closing an fd may wait for its file system: not on the loop.
            threading.Thread(target=self.discard, args=(result,), daemon=True).start()

    def expire(self, timeout: float) -> None:
        if self.give_up() and not self.future.done():
            self.future.set_exception(TimeoutError(errno.ETIMEDOUT, "no answer from the container's file "
                                                                    f"system within {timeout:g} s"))

    def give_up(self) -> bool:
        """True if the job's result will never come (it is abandoned); False if it is on its way."""
        with self.lock:
            self.abandoned = not self.finished
            return self.abandoned


class Workers:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT, threads: int = THREADS, waiting: int = WAITING) -> None:
        self.timeout = timeout
        self._max_threads, self._max_waiting = threads, waiting
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = self._in_flight = 0

    async def call(self, fn: Callable[..., T], *args: Any, discard: Callable[[T], None] | None = None,
                   needed: bool = False) -> T:
        """fn(*args) in one of these threads; OSError EBUSY if too many wait, ETIMEDOUT if too slow.
        A `needed` call (closing an fd) is never refused and runs even after its request gave up."""
        with self._lock:
            if self._in_flight >= self._max_waiting and not needed:
                raise OSError(errno.EBUSY, f"{self._in_flight} requests of this session wait for the container's "
                                           "file system already")
            self._in_flight += 1
            spawn = self._idle == 0 and self._threads < self._max_threads
            self._threads += spawn
        loop = asyncio.get_running_loop()
        job = _Job(loop, fn, args, discard, needed)
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._work, name="mirrord-ns files", daemon=True).start()
        # A timer, not wait_for: no task per request (every read of a mount comes through here).
        timer = loop.call_later(self.timeout, job.expire, self.timeout)
        try:
            return await job.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:  # the channel closed meanwhile
            job.give_up()
            raise
        finally:
            timer.cancel()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads -= 1
                    return
            job.run()
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        """Idle threads end; a hung one ends when its file system answers (or never: a daemon)."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)

