"""What the API server says about the agent's Job and its pod, as it happens.

Each followed list (the Job, its pods, the Events of each) is a watch in a thread of its
own, all feeding one queue, so `wait` returns as soon as any of them changed. A server
that refuses a watch (no `watch` in the user's role, a stand-in without it) gets that list
read every POLL s instead, and every RESYNC s all lists are read again, which also
catches an object made between a watch's replay and its stream.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from kubernetes import client, watch

from mirrord_tun.kube.cluster import api_errors, describe
from mirrord_tun.kube.errors import KubeError

log = logging.getLogger("mirrord-ns")
POLL = 0.5
RESYNC = 5.0
WATCH_SECONDS = 60  # the server ends a watch after this, and it is started again
_UNWATCHABLE = "UNWATCHABLE"


@dataclass
class _Source:
    what: str  # for messages: "pods of job X"
    list_fn: Callable[..., Any]
    kwargs: dict[str, Any]
    required: bool  # a refused list ends the start; otherwise it only shows less
    items: dict[str, Any] = field(default_factory=dict)  # uid -> the object as last seen
    watching: bool = True
    refused: bool = False


def _key(obj: Any) -> str:
    meta = obj.metadata
    return meta.uid or f"{meta.namespace}/{meta.name}"


class Feed:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._sources: list[_Source] = []
        self._queue: queue.Queue[tuple[_Source, str, Any]] = queue.Queue()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._streams: set[Any] = set()  # the watches' HTTP responses, being read
        self._threads: list[threading.Thread] = []
        self._resynced = self._polled = time.monotonic()

    def follow(self, what: str, list_fn: Callable[..., Any], required: bool = False,
               **kwargs: Any) -> dict[str, Any]:
        """Keep up with list_fn(namespace, **kwargs); the dict returned is kept current (uid -> object)."""
        source = _Source(what, list_fn, kwargs, required)
        self._sources.append(source)
        thread = threading.Thread(target=self._watch, args=(source,), name=f"watch {what}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return source.items

    def wait(self, timeout: float) -> None:
        """Until something followed changed, or timeout s."""
        polling = [s for s in self._sources if not s.watching and not s.refused]
        try:
            item: tuple[_Source, str, Any] | None = self._queue.get(
                timeout=max(0.0, min(timeout, POLL if polling else RESYNC)))
        except queue.Empty:
            item = None
        while item is not None:
            self._apply(*item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None
        now = time.monotonic()
        if now - self._resynced >= RESYNC:
            self._resynced = self._polled = now
            self._relist(self._sources)
        elif polling and now - self._polled >= POLL:
            self._polled = now
            self._relist(polling)

    def close(self) -> None:
        """Stop following, and wait for the watch threads: one still reading when the interpreter
        exits can crash it."""
        self._stopped.set()
        with self._lock:
            streams = list(self._streams)
        for resp in streams:
            with contextlib.suppress(Exception):  # already ended, or released
                resp.shutdown()  # wakes up the thread blocked reading it
        for thread in self._threads:
            thread.join(5)

    def _watch(self, source: _Source) -> None:
        decoder = watch.Watch()
        kind = decoder.get_return_type(source.list_fn)
        while not self._stopped.is_set():
            resp = None
            try:
                resp = source.list_fn(self.namespace, watch=True, _preload_content=False,
                                      timeout_seconds=WATCH_SECONDS, _request_timeout=(15, WATCH_SECONDS + 15),
                                      **source.kwargs)
                with self._lock:
                    if self._stopped.is_set():
                        return
                    self._streams.add(resp)
                for line in watch.watch.iter_resp_lines(resp):
                    event = decoder.unmarshal_event(line, kind)
                    if event["type"] == "ERROR":
                        raw = event["raw_object"]
                        if raw.get("code") == 410:  # the server forgot where the watch was: start again
                            break
                        raise client.ApiException(status=raw.get("code"), reason=raw.get("message"))
                    self._queue.put((source, event["type"], event["object"]))
            except client.ApiException as e:
                self._queue.put((source, _UNWATCHABLE, describe(e)))
                return
            except Exception:  # noqa: BLE001 - a dropped or timed-out stream, or close(): start again
                self._stopped.wait(POLL)
            finally:
                if resp is not None:
                    with self._lock:
                        self._streams.discard(resp)
                    # Closed, not just released: a stream cut short must not serve the next request.
                    resp.close()
                    resp.release_conn()

    def _apply(self, source: _Source, kind: str, obj: Any) -> None:
        if kind == _UNWATCHABLE:
            if source.watching:
                log.info("cannot watch %s (%s); reading it every %g s", source.what, obj, POLL)
            source.watching = False
            self._polled = time.monotonic()
            self._relist([source])
        elif kind == "DELETED":
            source.items.pop(_key(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            source.items[_key(obj)] = obj

    def _relist(self, sources: list[_Source]) -> None:
        for source in sources:
            if source.refused:
                continue
            try:
                with api_errors(f"cannot list the {source.what}"):
                    items = source.list_fn(self.namespace, **source.kwargs).items
            except KubeError as e:
                if source.required:
                    raise
                if e.status is not None:  # the API said no (RBAC): it will not say yes later
                    log.info("%s; the status line shows less", e)
                    source.refused = True
                continue
            source.items.clear()
            source.items.update((_key(obj), obj) for obj in items)
