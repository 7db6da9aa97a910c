"""The engine pair of this worker process, built once and reused across shards."""

from __future__ import annotations

import threading


class EngineCache:
    """One engine pair per worker process, reused across shards; one shard at a time on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._sampler = None

    def run(self, key: str, build, work):
        with self._lock:
            if self._key != key:
                self._key, self._sampler = None, None
                self._sampler = build()
                self._key = key
            return work(self._sampler)


ENGINES = EngineCache()
