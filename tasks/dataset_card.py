"""Dataset cards: the `README.md` beside published Parquet, in the Hugging Face format.

The YAML header (license, task, `configs` pointing at the Parquet files) is what
`datasets.load_dataset` reads; the body says how the rows were made (each generation's resolved
settings, chat templates included), what validation found, the counts, the α histogram and the
commands that reproduce them. The facts a partition's rows cannot tell are kept in its Parquet
metadata (`distill.card`), so a card for any set of partitions can be written without the
catalog.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from sampler.soft_targets import SOFT_TARGET_COLUMNS
from tasks.training_columns import CONVERSATION_COLUMNS, TOKEN_COLUMNS, token_values

CARD_KEY = b"distill.card"
GENERATION_KEY = b"distill.generation"
HISTOGRAM_BINS = 10
#: In every card's title; an export's --overwrite replaces only a folder whose README has it.
CARD_TITLE = "distillation data from an optimal-sampling mixture"
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                   (1_000_000, "100K<n<1M"))


@dataclass(frozen=True)
class PartitionFacts:
    """What the card says about one partition beyond its rows."""

    dataset: str
    description: str
    run_date: str
    generation: str
    published_run_id: str
    counts: dict[str, int]        # generated, left_out_truncated, left_out_answer, published
    validation: dict[str, object]
    curation: dict[str, object]
    card: dict[str, object]       # the dataset config's `card` section (license, task, ...)
    chat_templates: dict[str, str | None]
    reproduce: str                # the distill command that made the partition

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes], where: str) -> PartitionFacts:
        if CARD_KEY not in metadata:
            raise ValueError(f"{where}: no {CARD_KEY.decode()} metadata; it was published "
                             "before dataset cards existed: run its date again")
        facts = json.loads(metadata[CARD_KEY])
        missing = [field.name for field in fields(cls) if field.name not in facts]
        if missing:
            raise ValueError(f"{where}: its {CARD_KEY.decode()} metadata lacks {missing}; it "
                             "was published by an earlier version: run its date again")
        return cls(**facts)


@dataclass(frozen=True)
class CardPart:
    """One partition in a card: its facts and its generation's resolved settings."""

    facts: PartitionFacts
    settings: dict


def train_split(data_files: list[str]) -> list[dict[str, object]]:
    """A fresh `data_files` entry per config, so the YAML holds no anchors or aliases."""
    return [{"split": "train", "path": list(data_files)}]


def columns_without(columns: list[str], names: tuple[str, ...]) -> list[str]:
    return [column for column in columns if column not in names]


def union(lists) -> list[str]:
    """The distinct items of several lists, in first-seen order."""
    return list(dict.fromkeys(item for items in lists for item in items))


def header(parts: list[CardPart], columns: list[str], data_files: list[str], rows: int) -> str:
    """The YAML front matter; three configs over the same files, each with the columns of one
    way of training (TRL's SFTTrainer takes input_ids over prompt/completion over messages)."""
    cards = [part.facts.card for part in parts]
    licenses = sorted({card["license"] for card in cards})
    meta = {
        "license": licenses[0] if len(licenses) == 1 else licenses,
        "language": union(card["language"] for card in cards),
        "task_categories": union(card["task_categories"] for card in cards),
        "tags": ["distillation", "synthetic", "optimal-sampling"],
        "pretty_name": f"{parts[0].facts.dataset} (optimal-sampling distillation)",
        "size_categories": [next((name for bound, name in SIZE_CATEGORIES if rows < bound),
                                 "n>1M")],
        "configs": [
            {"config_name": "default", "data_files": train_split(data_files), "default": True},
            {"config_name": "messages", "data_files": train_split(data_files),
             "columns": columns_without(columns, (*TOKEN_COLUMNS, *CONVERSATION_COLUMNS))},
            {"config_name": "prompt_completion", "data_files": train_split(data_files),
             "columns": columns_without(columns, (*TOKEN_COLUMNS, "messages"))},
        ],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def alpha_histogram(table: pa.Table, low: float, high: float) -> list[str]:
    """Markdown lines: every token's α in `HISTOGRAM_BINS` bins over [low, high]."""
    alphas = token_values(table["alpha"])
    if alphas.size == 0:
        return ["No tokens."]
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(np.clip(alphas, low, high), bins=HISTOGRAM_BINS,
                                 range=(low, high))
    widest = max(int(counts.max()), 1)
    lines = [f"{alphas.size:,} tokens: mean {alphas.mean():.4f}, std {alphas.std():.4f}, "
             f"min {alphas.min():.4f}, max {alphas.max():.4f}.", "",
             "| α | tokens | share | |", "|---|---:|---:|---|"]
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        bar = "█" * round(30 * count / widest)
        lines.append(f"| {left:.3f}–{right:.3f} | {count:,} | {count / alphas.size:.1%} | "
                     f"{bar} |")
    return lines


def importance_summary(table: pa.Table) -> list[str]:
    """Mean sequence log weight and the effective sample share (Σw)²/(n·Σw²)."""
    weights = table["log_importance_weight"].to_numpy(zero_copy_only=False).astype(np.float64)
    if weights.size == 0:
        return ["No rows."]
    scaled = np.exp(weights - weights.max())
    share = scaled.sum() ** 2 / (weights.size * (scaled ** 2).sum())
    return [f"Sequence log weight Σ(log θ − log q): mean {weights.mean():.3f}, min "
            f"{weights.min():.3f}, max {weights.max():.3f}; effective sample share of the "
            f"self-normalised weights {share:.1%} ({share * weights.size:.1f} of "
            f"{weights.size} rows)."]


def soft_target_section(parts: list[CardPart], table: pa.Table) -> list[str]:
    """What the soft-target columns hold, their k per generation and their size; nothing when
    no generation recorded them."""
    if not set(SOFT_TARGET_COLUMNS) <= set(table.column_names):
        return []
    ks = {part.facts.generation: part.settings["sampling"].get("top_logprobs", 0)
          for part in parts}
    tokens = pc.sum(pc.list_value_length(table["teacher_top_ids"])).as_py() or 0
    size = table.select(list(SOFT_TARGET_COLUMNS)).nbytes
    per_token = f"{size / tokens:.1f} bytes per token" if tokens else "no tokens"
    return [
        "## Soft targets", "",
        "`teacher_top_ids`, `teacher_top_logprobs`, `theta_top_ids`, `theta_top_logprobs`: at "
        "every generated token, the k most likely next tokens under the teacher and under the "
        "student θ and their log-probs, most likely first (`teacher_top_ids[i][0]` is the "
        "teacher's likeliest token at the place of `token_ids[i]`, which may or may not be among "
        "them). The distribution is each model's own log-softmax at temperature 1 over the shared "
        "vocabulary, before the mixing's temperature, top-k or top-p: what distillation losses "
        "compare. The teacher's is conditioned on the teacher's prompt (`teacher_prompt_ids`), "
        "the student's on its own (`theta_prompt_ids`). Computed in float32 on the device; ids "
        "int32, log-probs float32.", "",
        "k by generation: " + ", ".join(f"`{generation}` k = {k}" if k else
                                        f"`{generation}` not recorded (null)"
                                        for generation, k in ks.items()) + ".",
        f"Size: 16·k bytes of values per token (2 models × k × (4-byte id + 4-byte log-prob)) "
        f"plus 16 of list offsets; in these rows {size:,} bytes in memory for {tokens:,} "
        f"tokens, {per_token} (Parquet compresses them further). Shard validation checks, on "
        "every row, one list per generated token, k entries in each, ids non-negative and "
        "distinct, log-probs finite, ≤ 0 and most likely first.", ""]


def generation_section(part: CardPart, table: pa.Table) -> list[str]:
    """One generation's resolved settings, as the sampler ran them."""
    settings, facts = part.settings, part.facts
    sampling, prompts = settings["sampling"], settings["prompts"]
    rows = table.filter(pc.equal(table["generation"], facts.generation))
    commits = sorted({(c, d) for c, d in zip(rows["generated_commit"].to_pylist(),
                                             rows["generated_dirty"].to_pylist())},
                     key=str)
    lines = [f"### Generation `{facts.generation}`", ""]
    for role in ("teacher", "theta"):
        checkpoint = settings["checkpoints"][role]
        lines.append(f"- {role}: `{checkpoint['name']}` (fingerprint "
                     f"`{checkpoint['fingerprint']}`)")
    alpha = (f"fixed α = {sampling['fixed_alpha']}" if sampling["alpha_method"] == "fixed"
             else f"`{sampling['alpha_method']}`")
    top_k = sampling.get("top_logprobs", 0)     # absent from generations made before it
    lines += [
        f"- α: {alpha}, clamped to [{sampling['alpha_min']}, {sampling['alpha_max']}]",
        f"- sampling: temperature {sampling['temperature']}, top_p {sampling['top_p']}, "
        f"top_k {sampling['top_k']}, max_tokens {sampling['max_tokens']}, "
        f"samples_per_prompt {sampling['samples_per_prompt']}, seed {sampling['seed']}, "
        f"soft targets: {f'top {top_k}' if top_k else 'off'}",
        *engine_lines(settings["engine"]),
        f"- sampler version `{settings['sampler_version']}`; commits: " + ", ".join(
            f"`{commit}`" + (" with uncommitted changes to the generation code" if dirty
                             else "")
            for commit, dirty in commits),
        f"- chat templates: {'on' if prompts['chat_template'] else 'off'}", ""]
    for role in ("teacher", "theta"):
        lines += [f"{role} system prompt:", "", "```text", prompts[f"{role}_system"] or "(none)",
                  "```", "", f"{role} prompt template (fields from the source row):", "",
                  "```text", prompts[f"{role}_template"], "```", ""]
        template = facts.chat_templates.get(role)
        if template:
            lines += [f"{role} chat template:", "", "```jinja", template.rstrip("\n"), "```", ""]
    return lines


def engine_lines(engine: dict) -> list[str]:
    """The vLLM settings both engines got, then each engine's own, by name (a generation
    made before per-engine settings has none)."""
    shared = {name: value for name, value in engine.items() if name not in ("teacher", "theta")}
    lines = [f"- engine, both: {json.dumps(shared, sort_keys=True)}"]
    for role in ("teacher", "theta"):
        own = engine.get(role) or {}
        settings = ", ".join(f"`{name}` {json.dumps(value)}" for name, value in sorted(own.items()))
        lines.append(f"- engine, {role} alone: {settings or 'none'}")
    return lines


def partition_table(parts: list[CardPart]) -> list[str]:
    lines = ["| run date | generation | generated | left out: truncated | left out: answer | "
             "published | shards passed / quarantined / failed | dataset validation |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for part in parts:
        counts, checks = part.facts.counts, part.facts.validation
        suite = checks["dataset_suite"]
        verdict = (f"passed ({suite['successful']}/{suite['evaluated']} expectations)"
                   if suite["success"] else "failed: " + ", ".join(suite["failed"]))
        lines.append(f"| {part.facts.run_date} | `{part.facts.generation}` | "
                     f"{counts['generated']} | {counts['left_out_truncated']} | "
                     f"{counts['left_out_answer']} | {counts['published']} | "
                     f"{checks['shards_passed']} / {checks['shards_quarantined']} / "
                     f"{checks['shards_failed']} | {verdict} |")
    return lines


def curation_lines(parts: list[CardPart]) -> list[str]:
    """How rows were curated; partitions curated differently are listed by run date."""
    by_curation: dict[str, list[str]] = {}
    for part in parts:
        key = json.dumps(part.facts.curation, sort_keys=True)
        by_curation.setdefault(key, []).append(part.facts.run_date)
    lines = []
    for key, run_dates in by_curation.items():
        curation = json.loads(key)
        truncated = ("kept, with `truncated` set" if curation["keep_truncated"]
                     else "left out")
        check = (f"`{curation['answer_check']}` against source column "
                 f"`{curation['reference_column']}`" if curation["answer_check"] else "none")
        where = "" if len(by_curation) == 1 else f"run dates {', '.join(run_dates)}: "
        lines.append(f"- {where}rows that stopped at max_tokens: {truncated}; answer check: "
                     f"{check}")
    return lines


def render_card(parts: list[CardPart], table: pa.Table, data_files: list[str],
                commands: list[str]) -> str:
    """The whole card for the rows of `parts` (all in `table`), stored in `data_files`."""
    first = parts[0]
    generations = {part.facts.generation: part for part in parts}
    alpha_low = min(part.settings["sampling"]["alpha_min"] for part in parts)
    alpha_high = max(part.settings["sampling"]["alpha_max"] for part in parts)
    body = [
        f"# {first.facts.dataset}: {CARD_TITLE}", "",
        first.facts.description, "",
        "Each token was drawn from q ∝ θ^(1−α) · t^α, a per-token mixture of the teacher t and "
        "the student θ; α, log q, log t and log θ of every token are recorded.",
        f"{table.num_rows} rows, {len(set(table['prompt_id'].to_pylist()))} prompts, "
        f"run dates {', '.join(sorted({p.facts.run_date for p in parts}))}.", "",
        "## Load and train", "", "```python",
        "from datasets import load_dataset",
        "from trl import SFTConfig, SFTTrainer",
        "",
        "train = load_dataset(\"<this folder or hub id>\", split=\"train\")"
        "  # exact tokens: input_ids, labels",
        "trainer = SFTTrainer(model=\"<the student>\", train_dataset=train,",
        "                     args=SFTConfig(output_dir=\"out\"))  # CPU: use_cpu=True, bf16=False",
        "trainer.train()", "```", "",
        "Configs: `default` (every column; SFTTrainer trains on `input_ids`/`labels`, the "
        "student's own prompt ids then the sampled ids, prompt masked with -100, so "
        "`labels[len(theta_prompt_ids) + i]` is `token_ids[i]` with `alpha[i]`, `log_q[i]`, "
        "`log_teacher[i]`, `log_theta[i]`); `messages` (system, user, assistant: SFTTrainer "
        "applies the student's chat template; re-tokenised text may split differently from "
        "the sampled ids); `prompt_completion` (TRL's conversational prompt and completion, "
        "loss on the completion).", "",
        "## Columns", "",
        "| column | what |", "|---|---|",
        "| `messages` | the student's system prompt and user turn, then the completion |",
        "| `prompt`, `completion` | the same, split for TRL's prompt-completion form |",
        "| `input_ids`, `labels` | `theta_prompt_ids` + `token_ids`; labels -100 over the prompt |",
        "| `log_importance_weight` | Σ over tokens of log θ(y) − log q(y) |",
        "| `alpha`, `log_q`, `log_teacher`, `log_theta` | per generated token: α, and the "
        "log-prob of the sampled token under the mixture q (the behaviour policy: what "
        "importance-sampled and off-policy trainers, e.g. veRL's rollout correction, read as "
        "rollout log-probs), the teacher and the student θ |",
        "| `truncated` | stopped at `max_tokens` (`finish_reason = length`) |",
        "| `completion_text`, `theta_prompt`, `teacher_prompt` | texts; `*_prompt_ids` the "
        "exact ids each model read |",
        "| `generation`, `generated_*`, `published_*`, `*_model`, `*_fingerprint` | lineage |",
        *(["| `teacher_top_ids`, `teacher_top_logprobs`, `theta_top_ids`, `theta_top_logprobs` "
           "| per generated token, each model's k most likely tokens (see Soft targets) |"]
          if set(SOFT_TARGET_COLUMNS) <= set(table.column_names) else []),
        "",
        *soft_target_section(parts, table),
        "## Importance weights", "", *importance_summary(table), "",
        "Self-normalise within a batch or the dataset: w_i = exp(lw_i − max lw) / Σ_j exp(lw_j "
        "− max lw). Per token, exp(log_theta − log_q) is θ(y)/q(y).", "",
        "## Curation", "", *curation_lines(parts), "",
        "## Partitions and validation", "", *partition_table(parts), "",
        "Shard validation (Great Expectations) checks every row: text and both models' prompt "
        "ids present, token counts, finish reasons, per-row α within range, per-token arrays "
        "as long as the token count, log-probs finite and ≤ 0, unique rows; the dataset suite "
        "checks the row count, uniqueness and the share of rows that hit max_tokens.", "",
        f"## α per token (range [{alpha_low}, {alpha_high}])", "",
        *alpha_histogram(table, alpha_low, alpha_high), "",
        "## How it was generated", "",
        *(line for part in generations.values() for line in generation_section(part, table)),
        "## Reproduce", "",
        "At the commit above, with the same checkpoints (same fingerprints), these commands "
        "regenerate the same rows (draws are seeded from the dataset seed, the round and the "
        "shard):", "", "```bash", *commands, "```", "",
    ]
    return header(parts, table.column_names, data_files, table.num_rows) + "\n".join(body)


def chat_template_of(path: str | None) -> str | None:
    """A checkpoint folder's chat template (chat_template.jinja or tokenizer_config.json)."""
    if path is None:
        return None
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
