"""Errors the sampler raises, each naming the field, row or model that caused it."""


class SamplerError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(SamplerError, ValueError):
    """A sampling or engine setting is invalid; the message names the field."""


class IncompatibleModelsError(SamplerError, ValueError):
    """Teacher and theta cannot be mixed (different tokenizers, vocabularies)."""


class LockstepError(SamplerError, RuntimeError):
    """The two engines disagreed about what to compute in a step; never papered over."""


class MixingError(SamplerError, RuntimeError):
    """A row's two distributions cannot be mixed (no token both models allow, or a NaN
    logit): the message names the row; no α is made up for it."""


class BrokenPairError(SamplerError, RuntimeError):
    """An engine pair whose earlier call failed mid-step: its engines may hold a
    half-finished step, so it refuses work; build a new pair."""
