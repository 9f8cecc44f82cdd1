"""agent/fileworkers.py on its own: a call that never returns costs one thread and a clear error;
past the limits, requests are refused at once; a late result is discarded, a needed call still runs."""
from __future__ import annotations

import asyncio
import errno
import threading

import pytest

from mirrord_tun.agent.fileworkers import Workers


def test_hung_calls_time_out_fill_the_threads_and_then_are_refused() -> None:
    hang, discarded, closed = threading.Event(), threading.Event(), []

    def discard(result: int) -> None:
        closed.append(result)
        discarded.set()

    def stuck() -> int:
        hang.wait()
        return 42

    async def main() -> None:
        w = Workers(timeout=0.2, threads=2, waiting=3)
        with pytest.raises(TimeoutError) as e:
            await w.call(stuck, discard=discard)
        assert e.value.errno == errno.ETIMEDOUT and "within 0.2 s" in e.value.strerror
        await asyncio.gather(*(asyncio.wait_for(w.call(stuck), 5) for _ in range(2)), return_exceptions=True)
        with pytest.raises(OSError) as busy:  # three in flight (two stuck threads, one queued): refused at once
            await w.call(lambda: 1)
        assert busy.value.errno == errno.EBUSY
        ran: list[int] = []
        needed = asyncio.ensure_future(w.call(ran.append, 7, needed=True))  # never refused
        hang.set()  # the file system answers at last
        await needed
        assert ran == [7]
        assert await w.call(lambda: "after") == "after"
        w.close()

    asyncio.run(main())
    assert discarded.wait(5) and closed == [42]  # the first call's late result went to discard
