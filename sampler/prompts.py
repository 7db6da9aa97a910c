"""Turning each model's prompt text into token ids, and checking the two tokenizers agree.

Each model reads its prompt through its own tokenizer and chat template (real pairs share a
vocabulary but not a template). What the mixing needs the two to share is checked here: the
same token string behind every id of the shared vocabulary, and stop tokens inside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sampler.errors import IncompatibleModelsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a prompt: its own system prompt, chat template on or off."""

    system_prompt: str | None = None
    use_chat_template: bool = True


def load_tokenizer(model: str | Path, role: str) -> Any:
    """The model's Hugging Face tokenizer; a missing or unreadable model names its role."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as error:
        raise IncompatibleModelsError(f"model_{role}: cannot load a tokenizer from {model!r}: "
                                      f"{error}") from error


def control_token_strings(tokenizer: Any) -> set[str]:
    """Strings the tokenizer reads as one special or added token wherever they stand in a
    text (`<|im_start|>`, `<|assistant|>`): text from a source that holds one can forge a
    chat turn or end a prompt early, so source rows must not."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    return {token for token in added | set(tokenizer.all_special_tokens) if token}


def shared_vocab_size(teacher: Any, theta: Any) -> int:
    """Ids both tokenizers define, refusing a pair that gives one id two meanings.

    One tokenizer may define extra tokens after the shared range (added special tokens);
    those are never drawn. A differing token inside the shared range is named.
    """
    size = min(len(teacher), len(theta))
    teacher_tokens = teacher.convert_ids_to_tokens(list(range(size)))
    theta_tokens = theta.convert_ids_to_tokens(list(range(size)))
    if teacher_tokens != theta_tokens:
        first = next(i for i, (a, b) in enumerate(zip(teacher_tokens, theta_tokens)) if a != b)
        differing = sum(a != b for a, b in zip(teacher_tokens, theta_tokens))
        raise IncompatibleModelsError(
            f"teacher and theta tokenizers differ: token id {first} is "
            f"{teacher_tokens[first]!r} for the teacher and {theta_tokens[first]!r} for theta "
            f"({differing} of {size} shared ids differ; {len(teacher)} vs {len(theta)} tokens)")
    if len(teacher) != len(theta):
        logger.warning("teacher has %d tokens, theta %d: mixing over the %d ids both define",
                       len(teacher), len(theta), size)
    return size


def model_stop_token_ids(tokenizer: Any, model: str | Path) -> set[int]:
    """EOS ids of one model: its tokenizer's and its generation config's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(str(model)).eos_token_id
    except OSError:
        eos = None
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


def pair_stop_token_ids(teacher: Any, theta: Any, model_teacher: str | Path,
                        model_theta: str | Path, vocab_size: int) -> list[int]:
    """Stop tokens for both engines: either model's EOS ends the pair's sequence.

    Both engines must stop on the same tokens to stay in lockstep, so the sets are joined;
    a stop id outside the shared vocabulary could never be drawn and is refused.
    """
    teacher_ids = model_stop_token_ids(teacher, model_teacher)
    theta_ids = model_stop_token_ids(theta, model_theta)
    if teacher_ids != theta_ids:
        logger.warning("teacher stops on %s, theta on %s: both engines stop on either",
                       sorted(teacher_ids), sorted(theta_ids))
    outside = sorted(i for i in teacher_ids | theta_ids if i >= vocab_size)
    if outside:
        raise IncompatibleModelsError(
            f"stop token ids {outside} lie outside the {vocab_size} ids both tokenizers share")
    return sorted(teacher_ids | theta_ids)


def render_prompt_ids(tokenizer: Any, text: str, prompt_format: PromptFormat) -> list[int]:
    """Token ids of `text` as this model should see it: its own chat template and system
    prompt, exactly as `apply_chat_template` produces them."""
    if prompt_format.use_chat_template:
        messages = []
        if prompt_format.system_prompt:
            messages.append({"role": "system", "content": prompt_format.system_prompt})
        messages.append({"role": "user", "content": text})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    if prompt_format.system_prompt:
        text = f"{prompt_format.system_prompt}\n\n{text}"
    return list(tokenizer(text)["input_ids"])
