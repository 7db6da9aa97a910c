"""Optimal mixing sampler: tokens drawn from q ∝ π_θ^(1-α)·π_t^α with two vLLM engines.

A library on its own (no Prefect, no DuckDB): see `OptimalSamplingV1`.
"""

from sampler.errors import (BrokenPairError, ConfigError, IncompatibleModelsError,
                            LockstepError, MixingError, SamplerError)
from sampler.mixing import ALPHA_METHODS, MixingConfig

__all__ = [
    "ALPHA_METHODS", "BrokenPairError", "ConfigError", "IncompatibleModelsError", "LockstepError",
    "MixingConfig", "MixingError",
    "OptimalSamplingOutput", "OptimalSamplingV1", "SamplerError", "save_alpha_history",
]


def __getattr__(name: str):
    """Import the engine-backed API lazily, so the math is usable without loading vLLM."""
    if name in ("OptimalSamplingV1", "OptimalSamplingOutput", "save_alpha_history"):
        from sampler import api
        return getattr(api, name)
    raise AttributeError(name)
