"""Live matches for ``/stream``: each subscriber names a class and a threshold; every committed ingest is scored
against their class vectors and announced, in id order, as ``match`` events (``score >= threshold``) followed by
one ``ingest`` event. Everything here runs on the event loop's thread."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUEUE_EVENTS = 10_000  # events a subscriber may have waiting; beyond, new events are dropped (and counted)


@dataclass(eq=False)
class Subscriber:
    """One ``/stream`` client: its class, threshold, class vector and event queue."""

    class_id: int
    threshold: float
    vector: np.ndarray
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_EVENTS))
    dropped: int = 0


class Broadcast:
    """The subscribers of a service and what they have lost."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0  # events lost by subscribers that have left

    def subscribe(self, class_id: int, threshold: float, vector: np.ndarray) -> Subscriber:
        sub = Subscriber(class_id, threshold, vector)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            self.dropped += sub.dropped

    def stats(self) -> dict[str, int]:
        return {"subscribers": len(self.subscribers),
                "dropped": self.dropped + sum(s.dropped for s in self.subscribers)}

    def publish(self, start: int, vectors: np.ndarray, total: int) -> None:
        """Queue a ``match`` event for each new item at or above a subscriber's threshold, then an ``ingest``
        event (``added``, ``total``). A subscriber whose queue is full loses the event (counted in ``dropped``)."""
        now = time.time()
        for sub in list(self.subscribers):
            scores = vectors @ sub.vector
            events: list[tuple[str, dict[str, Any]]] = [
                ("match", {"id": start + int(i), "score": float(scores[i]), "class_id": sub.class_id,
                           "class": self.class_names[sub.class_id], "time": now})
                for i in np.flatnonzero(scores >= sub.threshold)]
            events.append(("ingest", {"added": len(vectors), "total": total, "time": now}))
            for event in events:
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.dropped += 1
