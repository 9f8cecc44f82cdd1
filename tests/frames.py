"""A test's end of a mirrord-ns channel: frames come in queued, `expect` waits for one.

Shared by the hand-driven client of test_bad_input (against the real agent) and the fake
agent of test_security_agent (against the real `run`); each says how it sends.
"""
from __future__ import annotations

import asyncio
from typing import Callable


class QueuedEndpoint:
    """A `channel.Endpoint` that queues every frame; flow control is not exercised."""

    timeout = 10.0  # seconds `expect` waits for a frame

    def __init__(self) -> None:
        self.frames: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

    def on_frame(self, kind: int, body: bytes) -> None:
        self.frames.put_nowait((kind, body))

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def expect(self, kind: int, match: Callable[[bytes], bool] = lambda _b: True) -> bytes:
        """The next frame of `kind` that `match`es; others (stray packets) are skipped."""
        async def wait() -> bytes:
            while True:
                got, body = await self.frames.get()
                if got == kind and match(body):
                    return body
        return await asyncio.wait_for(wait(), self.timeout)
