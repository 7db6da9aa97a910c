"""The columns a trainer reads, built from what generation recorded.

TRL's `SFTTrainer` takes any of three shapes with no glue code: `messages` (it applies the
student's chat template), conversational `prompt`/`completion` (loss on the completion), or
`input_ids`/`labels` (used as is). Only the last is exact: a sampled token sequence is often
not how the tokenizer would split its text, so re-tokenising the completion gives other ids
and the per-token α, log q, log t and log θ no longer line up. `input_ids` is therefore the
ids the student read (its own system prompt and chat template) followed by the sampled ids,
and `labels` the same with `IGNORE_INDEX` over the prompt: `labels[len(theta_prompt_ids) + i]`
is `token_ids[i]`, whose α is `alpha[i]`. (With `prompts.chat_template: false` the student
read plain text, its system prompt and the user text, and only `input_ids` is what it read.)
With a conversation (`prompts.messages_column`) the prompt is the student's whole history, so
only the generated turn trains.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sampler.prompts import Conversation, chat_messages
from tasks.config import PromptConfig

#: What PyTorch's cross-entropy (and so every Hugging Face causal LM) leaves out of the loss.
IGNORE_INDEX = -100
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TRAINING_SCHEMA = pa.schema([
    ("messages", MESSAGES), ("prompt", MESSAGES), ("completion", MESSAGES),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("log_importance_weight", pa.float64()), ("truncated", pa.bool_()),
])
#: Columns only one way of training reads; the card's configs leave out the others' so that
#: `SFTTrainer` picks the intended one (it prefers input_ids, then prompt/completion).
TOKEN_COLUMNS = ("input_ids", "labels")
CONVERSATION_COLUMNS = ("prompt", "completion")


def token_values(column: pa.ChunkedArray | pa.ListArray) -> np.ndarray:
    """Every token's value of a per-token column (α, log q, ...), all rows in order, float64."""
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float64)


def sequence_log_weights(log_theta: pa.ChunkedArray, log_q: pa.ChunkedArray) -> np.ndarray:
    """Per row, Σ over its tokens of log θ(y) − log q(y): the log of θ(y)/q(y) for the whole
    sequence, in float64."""
    theta = log_theta.combine_chunks()
    parents = pc.list_parent_indices(theta).to_numpy(zero_copy_only=False)
    return np.bincount(parents, weights=token_values(theta) - token_values(log_q),
                       minlength=len(theta))


def _flat(lists: pa.ChunkedArray | pa.ListArray) -> tuple[pa.ListArray, np.ndarray, np.ndarray]:
    """One list array, each value's row, and each value's place within its row."""
    array = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    starts = array.offsets.to_numpy()[:-1] - array.offsets[0].as_py()
    return array, parents, np.arange(len(parents)) - starts[parents]


def prompt_and_generated(prompt_ids: pa.ChunkedArray, generated_ids: pa.ChunkedArray
                         ) -> tuple[pa.ListArray, pa.ListArray]:
    """`input_ids` (prompt then generated ids, per row) and `labels` (the same with the
    prompt's places `IGNORE_INDEX`), built with Arrow's list layout rather than per row."""
    prompt, prompt_rows, prompt_places = _flat(prompt_ids)
    generated, generated_rows, generated_places = _flat(generated_ids)
    prompt_lengths = pc.list_value_length(prompt).to_numpy(zero_copy_only=False)
    lengths = prompt_lengths + pc.list_value_length(generated).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    at_prompt = offsets[prompt_rows] + prompt_places
    at_generated = offsets[generated_rows] + prompt_lengths[generated_rows] + generated_places
    ids = np.empty(offsets[-1], dtype=np.int32)
    ids[at_prompt] = pc.list_flatten(prompt).to_numpy(zero_copy_only=False)
    ids[at_generated] = pc.list_flatten(generated).to_numpy(zero_copy_only=False)
    labels = ids.copy()
    labels[at_prompt] = IGNORE_INDEX
    return (pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)))


def student_history(theta_prompt: str, prompts: PromptConfig) -> Conversation:
    """The turns the student's chat template rendered (`sampler.prompts.chat_messages`) from
    a shard's `theta_prompt`: a text, or a conversation stored as JSON (`sampler.prompts.stored_prompt`)."""
    prompt = json.loads(theta_prompt) if prompts.messages_column else theta_prompt
    return chat_messages(prompt, prompts.formats()[1])


def add_training_columns(table: pa.Table, prompts: PromptConfig) -> pa.Table:
    """`TRAINING_SCHEMA`'s columns first, then the generated ones."""
    histories = [student_history(text, prompts) for text in table["theta_prompt"].to_pylist()]
    answers = [[{"role": "assistant", "content": text}]
               for text in table["completion_text"].to_pylist()]
    input_ids, labels = prompt_and_generated(table["theta_prompt_ids"], table["token_ids"])
    columns = {
        "messages": [history + answer for history, answer in zip(histories, answers)],
        "prompt": histories,
        "completion": answers,
        "input_ids": input_ids,
        "labels": labels,
        "log_importance_weight": sequence_log_weights(table["log_theta"], table["log_q"]),
        "truncated": pc.equal(table["finish_reason"], "length"),
    }
    training = pa.table(columns, schema=TRAINING_SCHEMA)
    return pa.Table.from_arrays([*training.columns, *table.columns],
                                names=[*training.column_names, *table.column_names])
