"""Steal on the agent: a pod port's new connections handed to a session's program.

rules.py     nft rules per session and the dead-man switch; who steals what (Registry, SessionSteal)
proxy.py     filtered steal: one listener per pod port, each connection routed by the filters
http1.py     one client connection's HTTP/1.x requests, each sent to the pod or to a program
http2.py     the same for HTTP/2 with prior knowledge (h2c, gRPC), per stream
upstream.py  one connection to an upstream and the relay of one response from it
framing.py   HTTP/1.x heads and bodies: where they end (llhttp, strict)
filters.py   which requests a filtered steal takes (mirrord's filter language)

Only rules.py and proxy.py touch the kernel (nft, conntrack, policy routes, sockets);
the rest works on the transports it is given.
"""
