"""Turning each model's prompt into token ids, and checking the two tokenizers agree.

A prompt is a text (one user turn) or a conversation: a list of `{role, content}` turns
(system, user, assistant) ending with the user's, to which the model writes the next
assistant turn. Each model reads its prompt through its own tokenizer and chat template
(real pairs share a vocabulary but not a template) with its own system prompt. What the mixing needs the two to share is checked here: the
same token string behind every id of the shared vocabulary, and stop tokens inside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sampler.errors import IncompatibleModelsError

logger = logging.getLogger(__name__)


Conversation = list[dict[str, str]]
Prompt = str | Conversation
ROLES = ("system", "user", "assistant")
#: What a system turn of a conversation becomes: `replace` (the default): the model's own
#: system prompt takes its place (none, when the model has none), so each model reads its
#: own system prompt on every row as it does for a text prompt; `keep`: the conversation's
#: system turn stays, and the model's system prompt is used only where it has none;
#: `refuse`: a conversation holding a system turn is an error of its row.
SystemTurn = Literal["replace", "keep", "refuse"]
SYSTEM_TURNS: tuple[SystemTurn, ...] = ("replace", "keep", "refuse")


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a prompt: its own system prompt, chat template on or off, and what
    a conversation's own system turn becomes (`SystemTurn`)."""

    system_prompt: str | None = None
    use_chat_template: bool = True
    system_turn: SystemTurn = "replace"


def conversation_problem(value: Any, prompt_format: PromptFormat) -> str | None:
    """Why `value` is not a conversation this model can continue, naming the turn (counted
    from 1), or None. Turns hold `role` and `content` only: another key (a name, tool calls)
    would reach the chat template unchecked."""
    if not isinstance(value, (list, tuple)):
        return f"is not a list of turns but {type(value).__name__}"
    if not value:
        return "holds no turns"
    if not prompt_format.use_chat_template:
        return "is a conversation, which needs the chat template"
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            return f"turn {number} is not a {{role, content}} mapping but {type(turn).__name__}"
        if set(turn) != {"role", "content"}:
            return (f"turn {number} has the keys {sorted(map(str, turn))}; a turn holds "
                    "exactly role and content")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            return f"turn {number} has the unknown role {role!r} (roles: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"turn {number} ({role}) content is not text but {type(content).__name__}"
        if not content.strip():
            return f"turn {number} ({role}) is empty"
        if role == "system" and number > 1:
            return f"turn {number} is a system turn; only the first turn may be one"
        if role == "system" and prompt_format.system_turn == "refuse":
            return f"turn {number} is a system turn, which system_turn 'refuse' refuses"
    if value[-1]["role"] != "user":
        return (f"the last turn (turn {len(value)}) is the {value[-1]['role']}'s, not the "
                "user's")
    return None


def prompt_problem(prompt: Any, prompt_format: PromptFormat) -> str | None:
    """Why a row's prompt cannot be rendered (read after "row i: teacher prompt"), or None."""
    if prompt is None or isinstance(prompt, str):
        return None if prompt and prompt.strip() else "is empty"
    if isinstance(prompt, (list, tuple)):
        return conversation_problem(prompt, prompt_format)
    return f"is not a text or a list of turns but {type(prompt).__name__}"


def chat_messages(prompt: Prompt, prompt_format: PromptFormat) -> Conversation:
    """The turns the model's chat template renders: its system prompt (where
    `prompt_format.system_turn` puts it), then the text as the user's turn or the
    conversation's turns (checked by `conversation_problem`)."""
    turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
             else [{"role": turn["role"], "content": turn["content"]} for turn in prompt])
    if turns[0]["role"] == "system":
        if prompt_format.system_turn == "keep":
            return turns
        turns = turns[1:]
    system = prompt_format.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + turns


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


def render_prompt_ids(tokenizer: Any, prompt: Prompt, prompt_format: PromptFormat
                      ) -> list[int]:
    """Token ids of `prompt` (a text, or a conversation `conversation_problem` accepts) as
    this model should see it: its own chat template and system prompt, exactly as
    `apply_chat_template(chat_messages(...), add_generation_prompt=True)` produces them."""
    if prompt_format.use_chat_template:
        encoded = tokenizer.apply_chat_template(chat_messages(prompt, prompt_format),
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    text = prompt
    if prompt_format.system_prompt:
        text = f"{prompt_format.system_prompt}\n\n{text}"
    return list(tokenizer(text)["input_ids"])


def stored_prompt(prompt: Prompt) -> str:
    """A prompt as the warehouse and the shards store it: its text, or its turns as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
