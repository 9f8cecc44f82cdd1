"""The local end of the tunnel, as a session feature: namespace, TUN, steering and pump.

It opens the namespace the caller names (`run`: a fresh one; `attach`: a container's), makes
the TUN there with the session's tunnel addresses, lets the caller's `steer` route traffic
into it, and pumps packets between the TUN and the link (PACKETS frames). Stopping it undoes
all of that in reverse: the pump, the TUN (its routes and addresses go with it), what `steer`
asked to undo, the namespace handle.
"""
from __future__ import annotations

from typing import Callable

from mirrord_tun import protocol
from mirrord_tun.channel import Sender
from mirrord_tun.feature import Feature, Handler
from mirrord_tun.netns import links
from mirrord_tun.netns.namespace import NetNs
from mirrord_tun.netns.tun import Tun
from mirrord_tun.protocol import AgentMsg, ClientMsg
from mirrord_tun.pump import Counters, TunPump, destination_is, source_is

TUN_NAME = "mrd0"
# Routes traffic into the named TUN, inside the namespace; returns an undo or None.
Steer = Callable[[str], "Callable[[], None] | None"]


class Tunnel(Feature):
    def __init__(self, open_ns: Callable[[], NetNs], steer: Steer, welcome: protocol.Welcome,
                 out: Sender, counters: Counters) -> None:
        self._open_ns, self._steer, self._welcome = open_ns, steer, welcome
        self._out, self._counters = out, counters
        self.ns: NetNs | None = None
        self._tun: Tun | None = None
        self._undo: Callable[[], None] | None = None
        self._pump: TunPump | None = None

    def frames(self) -> dict[int, Handler]:
        return {AgentMsg.PACKETS: self._deliver}

    async def start(self) -> None:
        addrs = self._welcome.client_addrs
        self.ns = ns = self._open_ns()
        self._tun = tun = ns.call(Tun, TUN_NAME)
        ns.call(links.bring_up_tun, tun.name, addrs, self._welcome.mtu)
        self._undo = ns.call(self._steer, tun.name)
        self._pump = TunPump(tun.fd, self._out, ClientMsg.PACKETS, admit_out=source_is(*addrs),
                             admit_in=destination_is(*addrs), counters=self._counters)
        self._pump.start()

    async def stop(self) -> None:
        if self._pump:
            self._pump.stop()
        if self._tun is not None:
            self._tun.close(with_namespace=self.ns is not None and self.ns.private)
        if self.ns is not None:
            try:
                if self._undo is not None:
                    self.ns.call(self._undo)
            finally:
                self.ns.close()

    def _deliver(self, body: bytes) -> None:
        if self._pump:
            self._pump.deliver(body)
        else:  # the agent's packets before our TUN exists
            self._counters["dropped_frames_unexpected"] += 1

    def packet_pump(self) -> TunPump | None:
        return self._pump

    def pause_writing(self) -> None:
        if self._pump:
            self._pump.pause()

    def resume_writing(self) -> None:
        if self._pump:
            self._pump.resume()

    # Nothing to send packets to until a resume; the command's TCP retransmits what it sends meanwhile.
    on_detach = pause_writing
    on_resume = resume_writing
