"""One thread between the engine and the event loop.

The server submits every request unowned (not ``by_id``); this thread reads
all of their events with ``Runtime.poll()`` (the GIL released while it waits)
and hands each to its request's asyncio queue. One thread serves any number
of connections: a thread or executor slot per request would not scale to
hundreds of streams on a small machine.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Optional



class Dispatcher:
    def __init__(self, rt):
        self.rt = rt
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="pagedrt-serve-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def register(self, request_id: str, q: asyncio.Queue) -> None:
        """Routes a request id's events to `q`; called before the request is
        submitted, so that no event can come first."""
        with self._lock:
            self._queues[request_id] = q

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def active(self) -> int:
        with self._lock:
            return len(self._queues)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.rt.poll(timeout=0.05)
            except Exception:  # the runtime closed under us: nothing more will come
                if self._stop.wait(0.05):
                    return
                continue
            if not events:
                continue
            with self._lock:
                routed = [(self._queues.get(ev.request_id), ev) for ev in events]
            for q, ev in routed:
                if q is not None:  # a reader that left released its request; late events are dropped
                    self._loop.call_soon_threadsafe(q.put_nowait, ev)

