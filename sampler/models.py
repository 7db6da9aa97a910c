"""Finding a model pair before any work: local folder, Hugging Face cache, or the hub, once.

A model that cannot be loaded should fail a run in seconds with one message, not after every
shard has waited out the hub client's retries. So each name is tried where it can be found
without waiting: a local folder; the hub cache (no network); and only when the hub may be
used (`HF_HUB_OFFLINE` unset), one reachability request with no retries before anything is
downloaded. The pair is then checked as the sampler will check it (shared vocabulary, stop
tokens), so an incompatible pair fails here too.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sampler.errors import ConfigError
from sampler.prompts import pair_stop_token_ids, shared_vocab_size

logger = logging.getLogger(__name__)

#: Files any one of which means a folder holds weights (single file, sharded, or PyTorch).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.safetensors.index.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A loadable model: where it was found, and its tokenizer."""

    field: str        # the config field that named it, e.g. "models.teacher"
    name: str         # as given
    source: str       # "local folder", "hub cache" or "hub"
    path: str         # the folder it was loaded from; the name when it came from the hub
    tokenizer: Any


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, read now, so a
    change after import counts."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (tensor names, dtypes, shapes, offsets),
    read without the weights; `ValueError` if the file is shorter than the header says."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = handle.read(length)
    if len(header) != length:
        raise ValueError(f"{path.name} is shorter than its header says")
    return header


def _torn_weights(folder: Path) -> str | None:
    """The first safetensors file whose size is not what its header describes (a cut-short
    copy or download), read from the header alone; None when every file adds up."""
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        try:
            raw = safetensors_header(weights)
        except ValueError:
            return f"{weights.name} is {size} bytes, shorter than its header says"
        except struct.error:
            return f"{weights.name} has no readable safetensors header"
        try:
            header = json.loads(raw)
            end = max((tensor["data_offsets"][1] for key, tensor in header.items()
                       if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{weights.name} has no readable safetensors header"
        if 8 + len(raw) + end != size:
            return f"{weights.name} is {size} bytes, its header describes {8 + len(raw) + end}"
    return None


def _remedy(name: str) -> str:
    return (f"give a local checkpoint folder; or download {name!r} into the Hugging Face "
            f"cache where the hub is reachable (`hf download {name}`; HF_HUB_CACHE says where "
            f"the cache is), after which HF_HUB_OFFLINE=1 runs from the cache alone; or run "
            f"with network access to {_hub_endpoint()}")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _load(name: str, field: str, local_only: bool, chat_template: bool) -> Any:
    """Tokenizer and config from a folder or the hub cache (`local_only`), or the hub."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    AutoConfig.from_pretrained(name, local_files_only=local_only)
    if chat_template and tokenizer.chat_template is None:
        raise ConfigError(f"{field}: {name!r} has no chat template; set "
                          f"prompts.chat_template: false or give a model that has one")
    return tokenizer


def resolve_model(name: str, field: str, chat_template: bool = True) -> ResolvedModel:
    """Load `name`'s tokenizer and config where it can be found without waiting; a
    `ConfigError` naming `field`, the name and what to do otherwise."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            tokenizer = _load(str(folder), field, True, chat_template)
        except ConfigError:
            raise
        except (OSError, ValueError) as error:
            raise ConfigError(f"{field}: cannot load a tokenizer and config from the folder "
                              f"{name!r}: {error}") from error
        if not _has_weights(folder):
            raise ConfigError(f"{field}: the folder {name!r} has a tokenizer and config but no "
                              f"weights (no *.safetensors, *.bin or *.pt file); copy the "
                              f"checkpoint's weights into it")
        if torn := _torn_weights(folder):
            raise ConfigError(f"{field}: the weights in the folder {name!r} are incomplete or "
                              f"corrupt ({torn}); copy the checkpoint's weights again")
        return ResolvedModel(field, name, "local folder", str(folder), tokenizer)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{field}: {name!r} is neither an existing folder nor a hub model "
                          f"name; check the path") from None
    try:
        tokenizer = _load(name, field, True, chat_template)
        snapshot = Path(try_to_load_from_cache(name, "config.json")).parent
        return ResolvedModel(field, name, "hub cache", str(snapshot), tokenizer)
    except OSError as cache_miss:
        logger.info("%s: %s is not in the hub cache (%s)", field, name, cache_miss)
    if _hub_offline():
        raise ConfigError(f"{field}: {name!r} is not a local folder and not in the Hugging Face "
                          f"cache, and HF_HUB_OFFLINE is set; {_remedy(name)}")
    try:  # one request, no retries: a failure here is one that retries do not fix
        HfApi().model_info(name, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError as error:
        raise ConfigError(f"{field}: the hub has no model {name!r} (misspelt, or private or "
                          f"gated without a token: {type(error).__name__})") from None
    except Exception as error:  # noqa: BLE001 - any transport or HTTP failure: unreachable
        raise ConfigError(f"{field}: {name!r} is not a local folder and not in the Hugging Face "
                          f"cache, and the hub at {_hub_endpoint()} cannot be reached "
                          f"({type(error).__name__}: {error}); {_remedy(name)}") from None
    try:
        return ResolvedModel(field, name, "hub", name, _load(name, field, False, chat_template))
    except OSError as error:
        raise ConfigError(f"{field}: cannot load a tokenizer and config of {name!r} from the "
                          f"hub: {error}") from error


def resolve_pair(teacher: str, theta: str, chat_template: bool = True
                 ) -> tuple[ResolvedModel, ResolvedModel]:
    """Both models resolved, and the pair checked as the sampler checks it (shared
    vocabulary, stop tokens inside it): `ConfigError` or `IncompatibleModelsError`."""
    resolved = tuple(resolve_model(name, field, chat_template)
                     for name, field in ((teacher, "models.teacher"), (theta, "models.theta")))
    vocab_size = shared_vocab_size(resolved[0].tokenizer, resolved[1].tokenizer)
    pair_stop_token_ids(resolved[0].tokenizer, resolved[1].tokenizer, resolved[0].path,
                        resolved[1].path, vocab_size)
    for model in resolved:
        logger.info("%s: %s found (%s)", model.field, model.name, model.source)
    return resolved
