"""When the local end's connection drops: reconnect with backoff while the agent keeps the session.

The agent keeps a session whose connection died for its grace period (`resume_timeout`, from
WELCOME v4). Meanwhile the TUN, namespace and command stay as they are, and packets the
command sends are dropped (its TCP retransmits them). `keep_up` tries again and again to take
the session over a new connection (link.py's `resume`) until it works, the agent says no, the
grace period is over, or the caller's own end comes first.
"""
from __future__ import annotations

import asyncio
import logging
import socket

from mirrord_tun.connect import Gone, SetupError, printable
from mirrord_tun.link import AgentLink

log = logging.getLogger("mirrord-ns")
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 5.0  # backoff between attempts to reach the agent again


async def keep_up(link: AgentLink, *others: asyncio.Future[object]) -> str | None:
    """Keep the tunnel up until one of `others` is done (None), resuming the session after a
    dropped connection; the one line to say (without our prefix) once it is lost for good."""
    lost = await _until_lost(link, *others)
    if lost is not None:
        link.features.on_lost()
    return lost


async def _until_lost(link: AgentLink, *others: asyncio.Future[object]) -> str | None:
    while True:
        await asyncio.wait([*others, link.lost], return_when=asyncio.FIRST_COMPLETED)
        if any(f.done() for f in others):
            return None
        reason = link.lost.result()
        grace = link.session.resume_timeout if link.session else 0
        if not link.dropped or grace <= 0:
            return f"lost the tunnel: {reason}"
        # Lines, not a redrawn status line: the command owns the terminal by now.
        log.warning("lost the agent (%s); reconnecting…", reason)
        since = asyncio.get_running_loop().time()
        reconnecting = asyncio.ensure_future(_reconnect(link, grace))
        try:
            await asyncio.wait([*others, reconnecting], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reconnecting.done():
                reconnecting.cancel()
                await asyncio.gather(reconnecting, return_exceptions=True)
        if not reconnecting.done() or reconnecting.cancelled():
            return None
        failed = reconnecting.result()
        if failed:
            return f"cannot resume the session: {failed}"
        log.warning("resumed after %.1f s", asyncio.get_running_loop().time() - since)


async def _reconnect(link: AgentLink, grace: float) -> str | None:
    """Try again with backoff while the agent keeps the session; None once resumed, else why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    delay = RECONNECT_FIRST
    while True:
        try:
            await asyncio.wait_for(_attempt(link), max(1.0, deadline - loop.time()))
            return None
        except Gone as e:  # the agent said no (expired, another agent), or its pod is gone
            return str(e)
        except SetupError as e:
            last = str(e)
        except asyncio.TimeoutError:
            last = "no answer"
        if loop.time() + delay >= deadline:
            return f"{last} (gave up after the agent's {grace:g} s grace period)"
        log.info("reconnect failed: %s; again in %g s", last, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def _attempt(link: AgentLink) -> None:
    sock = await _new_sock(link) if link.new_sock else None
    await link.resume(sock)


async def _new_sock(link: AgentLink) -> socket.socket:
    assert link.new_sock is not None
    try:
        return await asyncio.to_thread(link.new_sock)  # API calls: off the event loop
    except SetupError:
        raise
    except Exception as e:  # noqa: BLE001 - the cluster client's own (websocket) errors: try again
        raise SetupError(f"cannot reach the agent pod: {printable(str(e))}") from None
