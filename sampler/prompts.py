"""Turning each model's prompt text into token ids, and checking the two tokenizers agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sampler.errors import IncompatibleModelsError


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


def check_same_tokenizer(teacher: Any, theta: Any) -> None:
    """Refuse a pair whose tokenizers would give the same token id different meanings."""
    teacher_vocab, theta_vocab = teacher.get_vocab(), theta.get_vocab()
    if teacher_vocab != theta_vocab:
        only_teacher = sorted(set(teacher_vocab) - set(theta_vocab))[:5]
        only_theta = sorted(set(theta_vocab) - set(teacher_vocab))[:5]
        moved = sum(1 for token, index in teacher_vocab.items()
                    if theta_vocab.get(token, index) != index)
        raise IncompatibleModelsError(
            "teacher and theta tokenizers differ: "
            f"{len(teacher_vocab)} vs {len(theta_vocab)} tokens, {moved} shared tokens with "
            f"different ids, only in teacher e.g. {only_teacher}, only in theta e.g. "
            f"{only_theta}")
    if teacher.eos_token_id != theta.eos_token_id:
        raise IncompatibleModelsError(
            f"teacher and theta tokenizers have different EOS ids "
            f"({teacher.eos_token_id} vs {theta.eos_token_id})")


def stop_token_ids(tokenizer: Any, *model_paths: str | Path) -> list[int]:
    """EOS ids of the tokenizer and of every model's generation config, shared by both."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for path in model_paths:
        try:
            eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
        except OSError:
            continue
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)


def render_prompt_ids(tokenizer: Any, text: str, prompt_format: PromptFormat) -> list[int]:
    """Token ids of `text` as this model should see it."""
    if prompt_format.use_chat_template:
        messages = []
        if prompt_format.system_prompt:
            messages.append({"role": "system", "content": prompt_format.system_prompt})
        messages.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if prompt_format.system_prompt:
        text = f"{prompt_format.system_prompt}\n\n{text}"
    return list(tokenizer(text)["input_ids"])
