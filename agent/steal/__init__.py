"""Steal on the agent: a pod port's new connections handed to a session's program.

rules.py     nft rules per session and the dead-man switch; who steals what (Registry, SessionSteal)
proxy.py     filtered steal: one listener per pod port, each connection routed by the filters
sockets.py   the proxy's sockets in the pod's namespace: listeners, transparent connects
workers.py   the agent's proxy workers (more processes accepting a filtered port), worker.py one of them
handoff.py   the messages between the agent and its workers (filters, fds, hand-overs)
http1.py     one client connection's HTTP/1.x requests, each sent to the pod or to a program
http2.py     the same for HTTP/2 with prior knowledge (h2c, gRPC), per stream
upstream.py  one connection to an upstream and the relay of one response from it
framing.py   HTTP/1.x heads and bodies: where they end (llhttp, strict)
filters.py   which requests a filtered steal takes (mirrord's filter language)

Only rules.py, proxy.py, sockets.py and worker.py (setns, prctl) touch the kernel (nft, conntrack,
policy routes, sockets);
the rest works on the transports it is given.
"""
