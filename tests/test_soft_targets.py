"""Soft targets (issue 27 part 2): each model's top-k log-probs per generated token.

`sampler.soft_targets.top_logprobs` against a float64 log-softmax of the same logits, every
row and every entry, within a bound derived from float32 rounding (`float32_log_softmax_bound`),
ties handled by rule; the shard schema, the validation check, the published columns and the card
on hand-built shard rows; and, on rows a real run published with `sampling.top_logprobs: 5`, the
training example of docs/soft-targets.md run as written there.
"""

from __future__ import annotations

import json
import math
import re
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from sampler.soft_targets import SOFT_TARGET_COLUMNS, split_soft_targets, top_logprobs
from tasks.config import DATASETS_DIR, REPO_ROOT, parse_dataset_config
from tasks.dataset_card import CardPart, PartitionFacts, render_card
from tasks.publishing import curate, publish_partition
from tasks.shard_rows import SHARD_SCHEMA, shard_schema
from tasks.validation import validation_frame

#: float32's unit roundoff: a correctly rounded operation is off by at most U relative.
U = 2.0 ** -24
GUIDE = REPO_ROOT / "docs" / "soft-targets.md"
DEMO_TEXT = (DATASETS_DIR / "demo.yaml").read_text()
DEMO = parse_dataset_config(DEMO_TEXT, "demo.yaml")
RUN_DATE = date(2026, 5, 6)
K = 5


def float32_log_softmax_bound(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 log-softmax of float32-exact `logits` [rows, n], and a bound on how far a
    float32 two-pass log-softmax (max m, then S = Σ exp(x − m), then x − m − log S, in any
    summation order and either association of the last step) can be from it, per entry.

    With u = 2^-24: the sum's relative error is at most (n − 1)u (any summation order), plus
    2u for exp (within 1 ulp) and u·(m − min x) from rounding x − m before exp; so
    ε_S = (n + 1 + m − min x)·u and log S is off by at most ε_S / (1 − ε_S). Rounding log S
    (1 ulp), x − m, m + log S and the final subtraction adds at most 2u·(|x| + |m| + |log S| +
    |result|)."""
    top = logits.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    reference = logits - top - log_sum
    n = logits.shape[-1]
    relative = (n + 1 + top - logits.min(axis=-1, keepdims=True)) * U
    bound = (relative / (1 - relative)
             + 2 * U * (np.abs(logits) + np.abs(top) + np.abs(log_sum) + np.abs(reference)))
    return reference, bound


def assert_top_k_of_reference(ids: np.ndarray, values: np.ndarray, logits: np.ndarray, k: int
                              ) -> int:
    """Every row: values within the bound of the float64 log-prob of their ids, most likely
    first; ids distinct and in the vocabulary; at each rank the id's float64 log-prob within
    the row's tie width (2 × its largest bound) of the float64 k-th order value, and the very
    id of the float64 ranking wherever that value is farther than the tie width from its
    neighbours. Returns how many ranks were ties."""
    reference, bound = float32_log_softmax_bound(logits)
    rows, vocab = logits.shape
    order = np.argsort(-reference, axis=1, kind="stable")
    ranked = np.take_along_axis(reference, order, axis=1)
    ties = 0
    for row in range(rows):
        row_ids = ids[row].astype(np.int64)
        assert np.array_equal(row_ids, ids[row]), (row, ids[row])   # whole numbers
        assert ((row_ids >= 0) & (row_ids < vocab)).all(), (row, row_ids)
        assert len(set(row_ids.tolist())) == k, (row, row_ids)
        exact = reference[row, row_ids]
        assert (np.abs(values[row] - exact) <= bound[row, row_ids]).all(), (
            row, values[row] - exact, bound[row, row_ids])
        assert (np.diff(values[row]) <= 0).all(), (row, values[row])
        width = 2 * bound[row].max()
        assert (np.abs(exact - ranked[row, :k]) <= width).all(), (row, exact, ranked[row, :k])
        gaps = np.abs(np.diff(ranked[row, :min(k + 1, vocab)]))
        before = np.concatenate([[np.inf], gaps])[:k]
        after = np.concatenate([gaps, [np.inf]])[:k]
        tied = (before <= width) | (after <= width)
        ties += int(tied.sum())
        assert np.array_equal(row_ids[~tied], order[row, :k][~tied]), (
            row, row_ids, order[row, :k], tied)
    return ties


def logits_of(rows: int, width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Spread, peaked and nearly flat rows, rounded to `dtype` (the reference reads the same
    rounded values)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    logits[1::3, 7] += 30.0                       # one token holds almost all the mass
    logits[2::3] *= 1e-3                          # nearly uniform: near-ties everywhere
    return logits.to(dtype)


def reference_of(logits: torch.Tensor, vocab: int) -> np.ndarray:
    return logits[:, :vocab].double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, padding, k", [(2048, 0, 5), (2048, 64, 20), (20, 3, 20),
                                               (1000, 24, 1)])
def test_top_logprobs_are_each_models_float32_log_softmax_top_k(dtype, vocab, padding, k):
    """Teacher and theta halves, each against its own logits; the columns past the shared
    vocabulary (an engine's padded head) hold the largest logits, so reading them would fail."""
    teacher = logits_of(9, vocab + padding, 0, dtype)
    theta = logits_of(9, vocab + padding, 1, dtype)
    teacher[:, vocab:] = theta[:, vocab:] = 100.0
    columns = top_logprobs(teacher, theta, vocab, k)
    assert columns.dtype == torch.float64 and columns.shape == (9, 4 * k)
    parts = split_soft_targets(columns.numpy(), k)
    for role, logits in (("teacher", teacher), ("theta", theta)):
        assert_top_k_of_reference(parts[f"{role}_top_ids"], parts[f"{role}_top_logprobs"],
                                  reference_of(logits, vocab), k)


def test_exact_ties_may_come_in_either_order_but_only_from_the_tied_group():
    """bfloat16 logits drawn from 5 values: every rank is tied with another, so only the
    membership rule can hold, and it is checked at every rank."""
    generator = torch.Generator().manual_seed(2)
    levels = torch.tensor([0.0, -0.5, -1.0, -2.0, -4.0], dtype=torch.float64)
    logits = levels[torch.randint(0, 5, (6, 300), generator=generator)].to(torch.bfloat16)
    columns = top_logprobs(logits, logits.flip(0), 300, 8).numpy()
    parts = split_soft_targets(columns, 8)
    ties = assert_top_k_of_reference(parts["teacher_top_ids"], parts["teacher_top_logprobs"],
                                     reference_of(logits, 300), 8)
    assert ties == 6 * 8
    assert_top_k_of_reference(parts["theta_top_ids"], parts["theta_top_logprobs"],
                              reference_of(logits.flip(0), 300), 8)


def test_split_soft_targets_lays_out_the_four_blocks_in_column_order():
    columns = np.arange(2 * 12, dtype=np.float64).reshape(2, 12)
    parts = split_soft_targets(columns, 3)
    assert list(parts) == list(SOFT_TARGET_COLUMNS)
    for position, name in enumerate(SOFT_TARGET_COLUMNS):
        assert np.array_equal(parts[name], columns[:, 3 * position:3 * position + 3])
        assert parts[name].dtype == (np.int64 if name.endswith("_ids") else np.float64)


# --- shards, validation, publishing and the card, on hand-built rows -------------------------

def soft_target_lists(tokens: list[int], k: int, seed: int) -> dict[str, list]:
    """Per row, the real function's top k of random logits, one list of k per token."""
    lists: dict[str, list] = {name: [] for name in SOFT_TARGET_COLUMNS}
    for row, count in enumerate(tokens):
        teacher, theta = (logits_of(count, 64, seed + 2 * row + part, torch.float32)
                          for part in (0, 1))
        parts = split_soft_targets(top_logprobs(teacher, theta, 64, k).numpy(), k)
        for name in SOFT_TARGET_COLUMNS:
            lists[name].append(parts[name].tolist())
    return lists


def shard_rows(k: int, tokens: tuple[int, ...] = (2, 3, 1)) -> pa.Table:
    """Rows as generation writes them: `shard_schema(k)`, lineage included."""
    rows = len(tokens)
    columns = {
        "prompt_id": [f"p{i}" for i in range(rows)], "sample_index": [0] * rows,
        "content_hash": ["h"] * rows, "teacher_prompt": ["t"] * rows,
        "theta_prompt": [f"question {i}" for i in range(rows)],
        "teacher_prompt_ids": [[5, 6]] * rows, "theta_prompt_ids": [[7, 8, 9]] * rows,
        "completion_text": ["x"] * rows, "token_ids": [[11] * n for n in tokens],
        "num_tokens": list(tokens), "finish_reason": ["stop"] * rows, "error": [None] * rows,
        "alpha": [[0.75] * n for n in tokens],
        **{name: [[-0.5] * n for n in tokens] for name in ("log_q", "log_teacher", "log_theta")},
        **{name: [0.75] * rows for name in ("alpha_mean", "alpha_min", "alpha_max")},
        "alpha_std": [0.0] * rows, "seed": [1] * rows, "sample_round": ["first"] * rows,
        "generation": ["g1"] * rows, "generated_run_id": ["run-1"] * rows,
        "generated_at": [None] * rows, "sampler_version": ["v"] * rows,
        "generated_commit": ["c"] * rows, "generated_dirty": [False] * rows,
        "teacher_model": ["tiny:teacher"] * rows, "teacher_fingerprint": ["tf"] * rows,
        "theta_model": ["tiny:theta"] * rows, "theta_fingerprint": ["sf"] * rows,
    }
    if k:
        columns.update(soft_target_lists(list(tokens), k, seed=10))
    return pa.table(columns, schema=shard_schema(k))


def test_without_the_setting_the_shard_schema_is_the_one_before_it():
    assert shard_schema(0) is SHARD_SCHEMA
    with_them = shard_schema(3)
    assert with_them.names == [*SHARD_SCHEMA.names, *SOFT_TARGET_COLUMNS]
    for name in SOFT_TARGET_COLUMNS:
        inner = pa.int32() if name.endswith("_ids") else pa.float32()
        assert with_them.field(name).type == pa.list_(pa.list_(inner))


def test_the_validation_check_flags_bad_soft_targets_row_by_row():
    """Row 0 is sound; the others each break one rule: a token with k − 1 entries, a repeated
    id, a negative id, a log-prob above 0, log-probs out of order, a NaN, one list per token
    too few, a null list."""
    k = 3
    table = shard_rows(k, tokens=(2,) * 9)
    lists = {name: table[name].to_pylist() for name in SOFT_TARGET_COLUMNS}
    lists["teacher_top_ids"][1][0] = lists["teacher_top_ids"][1][0][:2]
    lists["theta_top_ids"][2][1] = [4, 4, 9]
    lists["teacher_top_ids"][3][1] = [4, -1, 9]
    lists["theta_top_logprobs"][4][0] = [0.25, -1.0, -2.0]
    lists["teacher_top_logprobs"][5][1] = [-1.0, -0.5, -2.0]
    lists["theta_top_logprobs"][6][0] = [-0.5, float("nan"), -2.0]
    lists["teacher_top_logprobs"][7] = lists["teacher_top_logprobs"][7][:1]
    lists["theta_top_ids"][8] = None
    for name, values in lists.items():
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(values, table.schema.field(name).type))
    frame = validation_frame(table, k)
    assert frame["soft_targets_well_formed"].tolist() == [True] + [False] * 8
    assert not set(SOFT_TARGET_COLUMNS) & set(frame.columns)
    assert validation_frame(shard_rows(k), k)["soft_targets_well_formed"].tolist() == [True] * 3
    assert validation_frame(shard_rows(k), 4)["soft_targets_well_formed"].tolist() == [False] * 3
    assert validation_frame(shard_rows(0), k)["soft_targets_well_formed"].tolist() == [False] * 3
    assert "soft_targets_well_formed" not in validation_frame(shard_rows(0)).columns


def settings_of(k: int) -> dict:
    """The demo's generation settings as published, with `top_logprobs` k."""
    settings = {**DEMO.generation_settings(), "sampler_version": "v",
                "checkpoints": {role: {"name": f"tiny:{role}", "fingerprint": f"{role[0]}f"}
                                for role in ("teacher", "theta")}}
    settings["sampling"]["top_logprobs"] = k
    return settings


def facts_of(generation: str, rows: int) -> PartitionFacts:
    """A partition of `rows` rows, all published, every check passed."""
    suite = {"success": True, "failed": [], "evaluated": 3, "successful": 3}
    return PartitionFacts(
        dataset="demo", description="", run_date=RUN_DATE.isoformat(), generation=generation,
        published_run_id="run-1",
        counts={"generated": rows, "left_out_truncated": 0, "left_out_answer": 0,
                "published": rows},
        validation={"shards_passed": 1, "shards_quarantined": 0, "shards_failed": 0,
                    "dataset_suite": suite},
        curation=DEMO.curation.model_dump(), card=DEMO.card.model_dump(),
        chat_templates={"teacher": None, "theta": None}, reproduce="python -m flows.distill")


def publish(table: pa.Table, k: int, folder: Path) -> tuple[pa.Table, pa.Table, str]:
    """`table` curated and published as a partition of generation g1 in `folder`: the
    curated rows, the file's rows and the card."""
    curated = curate(table, DEMO, {}, {"published_run_id": "run-1"})
    path = folder / "data.parquet"
    publish_partition(curated.table, path, json.dumps(settings_of(k)),
                      facts_of("g1", curated.table.num_rows))
    return curated.table, pq.read_table(path), (folder / "README.md").read_text()


def test_published_rows_carry_the_soft_targets_and_the_card_describes_them(tmp_path):
    shard = shard_rows(3)
    curated, published, card = publish(shard, 3, tmp_path)
    tokens = 2 + 3 + 1
    for name in SOFT_TARGET_COLUMNS:
        assert published.schema.field(name).type == shard.schema.field(name).type
        assert published[name].to_pylist() == shard[name].to_pylist()
    size = curated.select(list(SOFT_TARGET_COLUMNS)).nbytes
    for text in ("## Soft targets", "`g1` k = 3", "log-softmax at temperature 1 over the shared "
                 "vocabulary, before the mixing's temperature, top-k or top-p",
                 "16·k bytes of values per token", f"{size:,} bytes in memory for {tokens} "
                 f"tokens, {size / tokens:.1f} bytes per token", "soft targets: top 3",
                 "| `teacher_top_ids`, `teacher_top_logprobs`, `theta_top_ids`, "
                 "`theta_top_logprobs` |"):
        assert text in card, text
    # per column and token, k values and an inner offset of 4 bytes; per row (and one more) an
    # outer offset of 4; at most a validity bit per token and row at each level
    floor = 4 * 4 * tokens * (3 + 1)
    assert floor <= size <= floor + 4 * (4 * (2 + shard.num_rows + 1) + 2 * (tokens + 3))


def test_a_dataset_without_the_setting_publishes_no_soft_target_columns(tmp_path):
    _, published, card = publish(shard_rows(0), 0, tmp_path)
    assert not set(SOFT_TARGET_COLUMNS) & set(published.column_names)
    assert "Soft targets" not in card and "soft targets: off" in card
    assert "theta_top_ids" not in card


def test_a_card_over_partitions_with_and_without_them_says_which_generation_has_them():
    with_them, without = shard_rows(2), shard_rows(0)
    without = without.set_column(without.schema.get_field_index("generation"), "generation",
                                 pa.array(["g0"] * without.num_rows))
    table = pa.concat_tables([curate(t, DEMO, {}, {}).table for t in (with_them, without)],
                             promote_options="permissive")
    parts = [CardPart(facts_of(generation, 3), settings_of(k))
             for generation, k in (("g1", 2), ("g0", 0))]
    card = render_card(parts, table, ["data/a.parquet"], [])
    assert "k by generation: `g1` k = 2, `g0` not recorded (null)." in card
    assert "6 tokens" in card       # the null rows of g0 count no tokens


# --- end to end: a real run publishes them and the guide's example trains on them -----------

@pytest.fixture(scope="module")
def soft_target_partition(tiny_pair, tmp_path_factory) -> Path:
    """The demo with `sampling.top_logprobs: 5` and 32-token samples (kept when truncated),
    run once with the real engines; its partition file."""
    import os

    from flows.distill import distill

    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    assert "max_tokens: 256" in DEMO_TEXT and "keep_truncated: false" in DEMO_TEXT
    text = (DEMO_TEXT.replace("max_tokens: 256", f"max_tokens: 32\n  top_logprobs: {K}")
            .replace("keep_truncated: false", "keep_truncated: true"))
    config = tmp_path_factory.mktemp("config") / "demo.yaml"
    config.write_text(text)
    data_dir = tmp_path_factory.mktemp("soft-targets")
    with prefect_test_harness(server_startup_timeout=120):
        summary = distill(dataset=str(config), run_date=RUN_DATE, shard_size=4,
                          data_dir=str(data_dir))
    assert summary["status"] == "published", summary
    return Path(summary["partition"])


def guide_blocks() -> list[str]:
    """The guide's Python blocks: the loss and step, then the loop over a partition."""
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    assert len(blocks) == 2
    return blocks


def test_a_run_publishes_k_soft_targets_per_token_and_its_card_says_so(soft_target_partition):
    table = pq.read_table(soft_target_partition)
    assert table.num_rows == 12
    for name in SOFT_TARGET_COLUMNS:
        inner = pa.int32() if name.endswith("_ids") else pa.float32()
        assert table.schema.field(name).type == pa.list_(pa.list_(inner))
    frame = validation_frame(table, K)
    assert frame["soft_targets_well_formed"].tolist() == [True] * table.num_rows
    card = (soft_target_partition.parent / "README.md").read_text()
    assert "## Soft targets" in card and f"k = {K}" in card and "soft targets: top 5" in card


def float64_loss(logits: list[np.ndarray], rows: list[dict]) -> tuple[float, float]:
    """The guide's loss recomputed in float64 from the same float32 logits and the stored
    top k, and a bound on the float32 computation's distance from it: per token, the
    log-softmax bound at the sampled id and at each top id, the teacher's renormalisation
    (the same bound over its k values) carried through p̂ (relative error ≤ its bound + 2u)
    onto |log p̂ − log θ|, the k-term sum (γ_{k+2} of its absolute terms) and the CE + KL
    addition (u); over tokens, the mean's summation (γ_N of the mean absolute value)."""
    per_token, bounds = [], []
    for row_logits, row in zip(logits, rows):
        log_theta, theta_bound = float32_log_softmax_bound(row_logits)
        stored = np.asarray(row["teacher_top_logprobs"], np.float32).astype(np.float64)
        log_teacher, teacher_bound = float32_log_softmax_bound(stored)
        teacher = np.exp(log_teacher)
        places = np.arange(len(row["token_ids"]))[:, None]
        top_ids = np.asarray(row["teacher_top_ids"])
        sampled = np.asarray(row["token_ids"])
        difference = log_teacher - log_theta[places, top_ids]
        cross_entropy = -log_theta[places[:, 0], sampled]
        kl = (teacher * difference).sum(axis=1)
        k = top_ids.shape[1]
        gamma_k = (k + 2) * U / (1 - (k + 2) * U)
        bounds.append(theta_bound[places[:, 0], sampled]
                      + (teacher * (teacher_bound + theta_bound[places, top_ids])).sum(axis=1)
                      + (teacher * (teacher_bound + 2 * U) * np.abs(difference)).sum(axis=1)
                      + gamma_k * (teacher * np.abs(difference)).sum(axis=1)
                      + U * (np.abs(cross_entropy) + np.abs(kl)))
        per_token.append(cross_entropy + kl)
    values, bound = np.concatenate(per_token), np.concatenate(bounds)
    gamma_n = values.size * U / (1 - values.size * U)
    return float(values.mean()), float(bound.mean() + gamma_n * np.abs(values).mean())


def test_the_guides_example_trains_on_the_published_rows(soft_target_partition, tmp_path,
                                                         monkeypatch):
    """Both blocks run as written (the partition's folder in place of the placeholder): the
    loss is finite, equals the float64 recomputation within its bound, and falls at each of
    four steps on the same rows."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    definitions, loop = guide_blocks()
    placeholder = 'folder = "data/published/dataset=demo/generation=<key>/run_date=<date>"'
    assert placeholder in loop
    namespace: dict = {}
    exec(definitions, namespace)                                  # noqa: S102 - the guide
    exec(loop.replace(placeholder, f"folder = {str(soft_target_partition.parent)!r}"),
         namespace)                                               # noqa: S102 - the guide
    assert len(namespace["losses"]) == 3 and all(math.isfinite(x) for x in namespace["losses"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("models/tiny/theta", dtype=torch.float32)
    rows = [namespace["rows"][i] for i in range(4)]
    with torch.no_grad():
        loss = namespace["soft_target_loss"](model, rows).item()
        logits = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double().numpy()
                  [len(row["theta_prompt_ids"]) - 1:-1] for row in rows]
    expected, bound = float64_loss(logits, rows)
    assert math.isfinite(loss)
    assert abs(loss - expected) <= bound, (loss, expected, bound)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = [namespace["train_step"](model, optimizer, rows) for _ in range(4)]
    assert steps[0] == pytest.approx(loss, abs=bound)
    assert all(later < earlier for earlier, later in zip(steps, steps[1:])), steps
