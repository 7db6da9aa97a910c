"""Errors the sampler raises, each naming the field, row or model that caused it."""


class SamplerError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(SamplerError, ValueError):
    """A sampling or engine setting is invalid; the message names the field."""


class IncompatibleModelsError(SamplerError, ValueError):
    """Teacher and theta cannot be mixed (different tokenizers, vocabularies)."""


class LockstepError(SamplerError, RuntimeError):
    """The two engines disagreed about what to compute in a step; never papered over."""
