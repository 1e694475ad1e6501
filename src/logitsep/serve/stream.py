"""Live matches for ``/stream``: each subscriber names a class and a threshold; every committed ingest is scored
against their class vectors and announced, in id order, as ``match`` events (``score >= threshold``) followed by
one ``ingest`` event. Everything here runs on the event loop's thread.

Memory stays bounded: at most :data:`MAX_SUBSCRIBERS` streams, each with at most :data:`QUEUE_EVENTS` waiting
events. A subscriber that does not read (a stalled client: its socket's send buffer full) and falls that far
behind is dropped: its queue is emptied (the events counted in ``dropped``) and its stream ends when it next
runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUEUE_EVENTS = 1_000  # events a subscriber may have waiting; a subscriber that falls this far behind is dropped
MAX_SUBSCRIBERS = 256  # open streams; more are refused (503)


class TooManySubscribers(RuntimeError):
    """The cap on open streams is reached."""


@dataclass(eq=False)
class Subscriber:
    """One ``/stream`` client: its class, threshold, class vector and event queue."""

    class_id: int
    threshold: float
    vector: np.ndarray
    name: str = ""  # the class's name when it subscribed (ids of enrolled classes can move; the stream's class not)
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_EVENTS))
    dropped: int = 0
    closed: bool = False  # dropped for falling behind: its stream ends


class Broadcast:
    """The subscribers of a service and what they have lost."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0  # events lost by subscribers that have left

    def full(self) -> bool:
        return len(self.subscribers) >= MAX_SUBSCRIBERS

    def subscribe(self, class_id: int, threshold: float, vector: np.ndarray) -> Subscriber:
        if self.full():
            raise TooManySubscribers(f"too many open streams ({len(self.subscribers)}, at most {MAX_SUBSCRIBERS})")
        sub = Subscriber(class_id, threshold, vector, self.class_names[class_id])
        self.subscribers.add(sub)
        return sub

    def drop(self, sub: Subscriber) -> None:
        """Drop a subscriber that fell behind: free its queue, count what it lost, end its stream."""
        sub.closed = True
        while not sub.queue.empty():
            sub.queue.get_nowait()
            sub.dropped += 1
        self.unsubscribe(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            self.dropped += sub.dropped

    def stats(self) -> dict[str, int]:
        return {"subscribers": len(self.subscribers),
                "dropped": self.dropped + sum(s.dropped for s in self.subscribers)}

    def publish(self, start: int, vectors: np.ndarray, total: int) -> None:
        """Queue a ``match`` event for each new item at or above a subscriber's threshold, then an ``ingest``
        event (``added``, ``total``). A subscriber whose queue is full is dropped (:meth:`drop`)."""
        now = time.time()
        for sub in list(self.subscribers):
            scores = vectors @ sub.vector
            events: list[tuple[str, dict[str, Any]]] = [
                ("match", {"id": start + int(i), "score": float(scores[i]), "class_id": sub.class_id,
                           "class": sub.name, "time": now})
                for i in np.flatnonzero(scores >= sub.threshold)]
            events.append(("ingest", {"added": len(vectors), "total": total, "time": now}))
            for i, event in enumerate(events):
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.dropped += len(events) - i
                    self.drop(sub)
                    break
