"""The engine pair of this worker process, built once and reused across shards."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class EngineBuildError(RuntimeError):
    """The engine pair could not be built (weights missing or corrupt, say): the same
    checkpoints fail the same way again, so neither a retry nor a later shard tries again."""


class EngineCache:
    """One engine pair per worker process, reused across shards; one shard at a time on it.

    A shard that fails mid-step discards the pair (after such a failure vLLM refuses the
    next step with a message that hides the cause), so the task's retry and every later
    shard start on a fresh pair; the first cause is logged. A failure that left the pair
    healthy (a refused setting, say) keeps it. A pair that cannot be built is built once:
    its `EngineBuildError` is remembered by key and raised again at once for later shards.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._sampler: Any = None
        self._build_failures: dict[str, str] = {}
        self.builds = 0                  # pairs built by this process (a worker reports it)

    def run(self, key: str, build: Callable[[], Any], work: Callable[[Any], Result],
            describe: str) -> Result:
        """`work` on the pair of `key`, built by `build` if needed; `describe` names the
        pair's models in a build failure's message."""
        with self._lock:
            if key in self._build_failures:
                raise EngineBuildError(self._build_failures[key])
            if self._key != key:
                self._discard()
                logger.info("%s: building the engine pair", describe)
                try:
                    self._sampler = build()
                    self.builds += 1
                except Exception as error:
                    self._build_failures[key] = (f"{describe}: cannot build the engine pair: "
                                                 f"{type(error).__name__}: {error}")
                    raise EngineBuildError(self._build_failures[key]) from error
                self._key = key
            try:
                return work(self._sampler)
            except BaseException as error:
                if not self._sampler.healthy:
                    logger.error("discarding the engine pair after a failed step; cause: %s: %s",
                                 type(error).__name__, error)
                    self._discard()
                raise

    def release(self) -> None:
        """Free the pair (its device memory) now, e.g. before a worker's process ends."""
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        sampler, self._sampler, self._key = self._sampler, None, None
        if sampler is not None:
            sampler.cleanup()


ENGINES = EngineCache()
