"""Throughput of mixed sampling against plain vLLM teacher-only generation, side by side.

Each arm runs in its own process (a plain `vllm.LLM` with its defaults cannot share the card
with the engine pair). On the GPU machine, one device call (10 minutes, 60–220 s of engine
start-up each included) a command, from the repository root; raw JSON and logs under
$OUT/work, results.json and results.md under $OUT:

    B="python3 benchmarks/throughput.py --models /tmp/models --out $OUT --work $OUT/work"
    # issue 25: the teacher on vLLM's multiprocess executor at TP=1 against the default
    # placement (theta in its own process), same prompts and seed (~6-8 min)
    $B --pairs 7b_0.5b --arms mixed_process,mixed_mp --batches 256 --lean
    # issue 25: the fp8 teacher beside the bf16 one: tok/s, |Δ log t| while tokens agree (~6-8 min)
    $B --pairs 7b_0.5b --arms mixed_process,mixed_fp8 --batches 256 --lean
    # plain vLLM with each teacher, for the ratios (~4-5 min)
    $B --pairs 7b_0.5b --arms baseline,baseline_fp8 --batches 256
    # issue 25: a Qwen2.5-72B-shaped fp8 teacher (dummy weights from a config.json written
    # under --models) alone at a 0.75 share, then beside the 0.5B student (~7-9 min)
    $B --pairs 72b_0.5b --arms baseline_fp8,mixed_fp8 --batches 64 --new-tokens 256 --lean
    # issue 26: long outputs, one arm a call (the longest row alone takes ~16k steps)
    $B --pairs 7b_0.5b --arms baseline_long      # ~4-6 min
    $B --pairs 7b_0.5b --arms mixed_long         # ~6-10 min

On the CPU, `--smoke` runs the same arms on tiny random Qwen2 checkpoints it writes under
--work (hidden size 128, head size 32 as the CPU attention needs, the real vocabulary) with
8 rows and few tokens, so that each code path runs before a device call is spent on it:

    python3 benchmarks/throughput.py --smoke --out /tmp/smoke --work /tmp/smoke/work --pairs 7b_0.5b --arms <arms> --lean

Arms, on the same token-id prompts (theta prompt 150–300 tokens, teacher prompt the same
plus 50–100 more), 512 new tokens ignoring EOS, batch 64 and 256 unless told:
- baseline: `vllm.LLM.generate` of the teacher with vLLM's default settings;
  baseline_fp8: the same with `quantization="fp8"`;
- mixed: the lockstep pair with kl_symmetry, steps overlapped (async scheduling); first the
  fused mixing kernels against the torch path on random logits of the real size; after the
  timed runs, the smallest batch again with the same seed (the sequences that repeat
  token for token are counted), one profiled run splitting step time into phases (device
  synchronised, so phases do not overlap there), a run with stop tokens (pairs stop one step
  before the scheduler learns of it), a record of a few sequences for the log-prob check,
  and a run under cProfile (the main process's busiest functions, ms a step);
- mixed_process: as mixed, with the theta engine in its own process (`sampler.engine_process`;
  the product's default on CUDA), so both engines' host work runs at once; mixed_processes:
  both engines in processes of their own, this one only mixing and checking. Each is
  profiled without synchronising the device: each phase's host time, waits for the engine
  processes' replies included, and where each worker's time goes;
- mixed_serial: the same pair with serial steps (no async scheduling), for comparison;
- mixed_mp: the teacher on vLLM's multiprocess executor at TP=1
  (`distributed_executor_backend="mp"`, `sampler.placement`'s tensor-parallel placement,
  serial steps), theta placed by the product's default;
- mixed_fp8: theta in its own process, the teacher quantized to fp8;
- baseline_long, mixed_long (issue 26): `max_tokens` 16,384 (`--long-tokens`) for every
  row, max_model_len 16,896 (prompt room 512 + max_tokens), batch 256 (`--long-batch`).
  Each row's length is drawn in advance from a log-normal of mean 3,000 (`--long-mean`),
  σ 0.8, seed 7, capped at max_tokens; both arms end it there the same way, unknown to
  either scheduler: plain vLLM through a logits processor (`ForcedStop`), the pair through
  a hook on its mixing (`force_pair_stops`; it reads the lockstep's `_mix` and the
  positions it passes to `draw_keys`), each forcing `STOP_TOKEN` at the drawn position
  and masking it before (random weights would otherwise draw it ~1/152k a token). Reports
  tok/s, wall time, peak concurrent sequences, preemptions, and how many rows ended at
  their drawn length (all of them, or the hook missed);
- every mixed arm's smallest-batch tokens are compared with those of the first of the
  mixed arms run, in the order given; while the tokens agree, the largest and mean
  |difference| of each recorded value (for mixed_fp8 against a bf16 arm: log t of the
  fp8 teacher against the bf16 one's, up to where the sequences part);
- check: transformers recomputes log t(y) and log θ(y) of the recorded sequences.
The pair's memory is the product's default split (`sampler.api.engine_memory_shares` of
`--pair-share`, 0.85 as `OptimalSamplingV1`'s default: weights, then the rest by KV bytes
a token, so both engines hold as many tokens); each arm's result has the split
(`memory_split`) and what the engines logged (weights GiB, KV GiB, KV tokens; teacher
first). Results: results.json (every arm's figures, and a failed arm's log tail) and
results.md under --out; per-arm files and logs under --work.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
logger = logging.getLogger("benchmark")


@dataclass(frozen=True)
class PairShapes:
    """The two checkpoints (folder names under --models) and settings of their engines."""

    teacher: str
    theta: str
    #: The teacher's settings in every arm (dummy weights for a teacher with no checkpoint).
    teacher_args: dict = field(default_factory=dict)
    #: Plain vLLM's settings over its defaults.
    baseline_args: dict = field(default_factory=dict)


PAIRS = {"7b_0.5b": PairShapes("qwen2.5-7b", "qwen2.5-0.5b"),
         "1.5b_0.5b": PairShapes("qwen2.5-1.5b", "qwen2.5-0.5b"),
         "72b_0.5b": PairShapes("qwen2.5-72b", "qwen2.5-0.5b", {"load_format": "dummy"},
                                {"gpu_memory_utilization": 0.75}),
         "smoke": PairShapes("qwen2.5-0.5b", "qwen2.5-0.5b")}
#: Qwen2.5-72B-Instruct's shapes, written as a config.json alone when --models lacks it.
QWEN_72B = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                torch_dtype="bfloat16")
#: --smoke's checkpoints: Qwen2 of the real vocabulary (the prompts' ids), tiny otherwise.
SMOKE_SHAPE = dict(vocab_size=151936, hidden_size=128, intermediate_size=256,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=32768, tie_word_embeddings=False)
SMOKE_ENGINE_ARGS = {"enforce_eager": True, "dtype": "float32"}
FP8 = {"quantization": "fp8"}
#: The token the long arms end each row with (no id a prompt holds, none special).
STOP_TOKEN = 151_000
#: Where `ForcedStop` writes the largest batch it saw (plain vLLM's engine core runs in a
#: process of its own).
PEAK_FILE_VARIABLE = "BENCHMARK_PEAK_FILE"
PROMPT_ROOM = 512     # the longest teacher prompt is 400 tokens
#: `ForcedStop` as vLLM loads it in its engine core's process (REPO_ROOT on PYTHONPATH).
FORCED_STOP = "benchmarks.throughput:ForcedStop"


@dataclass(frozen=True)
class Arm:
    """One way to generate: plain vLLM or the engine pair, its placement and settings."""

    pair: bool
    teacher_args: dict = field(default_factory=dict)
    theta_process: bool | None = False
    teacher_process: bool = False
    overlap: bool = True
    long: bool = False
    #: Runs the diagnostics of `run_mixed` after the timed runs (unless --lean).
    profiled: bool = False


ARM_SPECS = {
    "baseline": Arm(pair=False),
    "baseline_fp8": Arm(pair=False, teacher_args=FP8),
    "baseline_long": Arm(pair=False, long=True),
    "mixed": Arm(pair=True, profiled=True),
    "mixed_process": Arm(pair=True, theta_process=True, profiled=True),
    "mixed_processes": Arm(pair=True, theta_process=True, teacher_process=True,
                           profiled=True),
    "mixed_serial": Arm(pair=True, overlap=False, profiled=True),
    "mixed_mp": Arm(pair=True, teacher_args={"distributed_executor_backend": "mp"},
                    theta_process=None),
    "mixed_fp8": Arm(pair=True, teacher_args=FP8, theta_process=True),
    "mixed_long": Arm(pair=True, theta_process=True, long=True),
}
ARMS = (*ARM_SPECS, "check")
#: The arms whose smallest batch is compared token for token (and recorded for the check).
COMPARED_ARMS = tuple(name for name, arm in ARM_SPECS.items() if arm.pair and not arm.long)
CHECKED_SEQUENCES = 3


def make_prompts(count: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Theta prompts of 150–300 random token ids; teacher prompt = same + 50–100 more."""
    rng = np.random.default_rng(seed)
    theta, teacher = [], []
    for _ in range(count):
        ids = rng.integers(100, 150_000, size=int(rng.integers(150, 301))).tolist()
        extra = rng.integers(100, 150_000, size=int(rng.integers(50, 101))).tolist()
        theta.append(ids)
        teacher.append(ids + extra)
    return teacher, theta


def long_lengths(count: int, mean: float, cap: int, seed: int = 7) -> np.ndarray:
    """Each row's answer length: log-normal (σ 0.8) of the given mean, 1 to `cap` tokens."""
    sigma = 0.8
    drawn = np.random.default_rng(seed).lognormal(np.log(mean) - sigma**2 / 2, sigma, count)
    return np.clip(np.rint(drawn), 1, cap).astype(np.int64)


def write_checkpoints(models: Path, names: set[str], smoke: bool) -> None:
    """--smoke: a tiny random checkpoint for each name (seeded by its position, so teacher
    and theta differ); else the 72B shape's config.json where it is missing."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for seed, name in enumerate(sorted(names)):
        path = models / name
        if (path / "config.json").exists():
            continue
        if smoke:
            torch.manual_seed(seed)
            Qwen2ForCausalLM(Qwen2Config(**SMOKE_SHAPE)).save_pretrained(path)
        elif name == "qwen2.5-72b":
            Qwen2Config(**QWEN_72B).save_pretrained(path)


def gpu_facts() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"card": "cpu"}
    return {"card": torch.cuda.get_device_name(0),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def shared_engine_args(args: argparse.Namespace) -> dict:
    return {"skip_tokenizer_init": True, **(SMOKE_ENGINE_ARGS if args.smoke else {})}


def teacher_settings(args: argparse.Namespace, spec: Arm, settings: dict) -> dict:
    """The teacher's settings: the pair's and the arm's own over `settings`; fp8 needs
    16-bit activations, so --smoke's float32 gives way to bfloat16 there."""
    merged = {**settings, **PAIRS[args.pair].teacher_args, **spec.teacher_args}
    if args.smoke and "quantization" in merged:
        merged["dtype"] = "bfloat16"
    return merged


class ForcedStop(LogitsProcessor):
    """Benchmark-only (baseline_long): ends a request at the length in its
    `extra_args["stop_at"]` by forcing `STOP_TOKEN` there and masking it before, so plain
    vLLM's rows end where the pair's do without its scheduler knowing; writes the largest
    batch it saw to the file in $BENCHMARK_PEAK_FILE."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.stops: dict[int, tuple[int, list[int]]] = {}   # batch row → (length, output ids)
        self.peak = 0
        self.peak_file = os.environ.get(PEAK_FILE_VARIABLE)

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _stop(params, _prompt_ids, output_ids: list[int]) -> tuple[int, list[int]] | None:
        length = (params.extra_args or {}).get("stop_at")
        return None if length is None else (int(length), output_ids)

    def update_state(self, batch_update) -> None:
        process_dict_updates(self.stops, batch_update, self._stop)

    def apply(self, logits):
        if logits.shape[0] > self.peak:
            self.peak = logits.shape[0]
            if self.peak_file:
                Path(self.peak_file).write_text(str(self.peak))
        if self.stops:
            logits[list(self.stops), STOP_TOKEN] = float("-inf")
            due = [row for row, (length, output) in self.stops.items()
                   if len(output) == length - 1]
            if due:
                logits[due] = float("-inf")
                logits[due, STOP_TOKEN] = 0.0
        return logits


def run_baseline(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    spec, shapes = ARM_SPECS[args.arm], PAIRS[args.pair]
    teacher_prompts, _ = make_prompts(max(args.batches + [args.long_batch]))
    settings = teacher_settings(args, spec, {**shared_engine_args(args), **shapes.baseline_args})
    if spec.long:
        settings.update(max_model_len=PROMPT_ROOM + args.long_tokens, disable_log_stats=False,
                        logits_processors=[FORCED_STOP])
    llm = LLM(model=str(Path(args.models) / shapes.teacher), **settings)
    llm.generate([{"prompt_token_ids": p} for p in teacher_prompts[:8]],
                 SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    if spec.long:
        return {"long": run_baseline_long(args, llm, teacher_prompts), "settings": settings,
                **gpu_facts()}
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=1.0,
                            detokenize=False)
    results = {}
    for batch in args.batches:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in teacher_prompts[:batch]], params,
                               use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[str(batch)] = {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}
        logger.info("%s %s batch %d: %.0f tok/s", args.arm, shapes.teacher, batch,
                    tokens / seconds)
    return {"throughput": results, "settings": settings, **gpu_facts()}


def long_figures(lengths: np.ndarray, max_tokens: int, produced: list[int], seconds: float,
                 peak: int, preemptions: int | None) -> dict:
    """What a long arm reports; `lengths_as_drawn` counts the rows that ended at their
    drawn length (every row, unless the forced stop missed)."""
    tokens = int(sum(produced))
    return {"rows": len(produced), "max_tokens_each": max_tokens,
            "drawn_mean_length": float(lengths.mean()), "drawn_max_length": int(lengths.max()),
            "lengths_as_drawn": int(np.sum(np.asarray(produced) == lengths)),
            "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "peak_concurrent_sequences": peak, "preemptions": preemptions}


def run_baseline_long(args: argparse.Namespace, llm, teacher_prompts) -> dict:
    from vllm import SamplingParams

    lengths = long_lengths(args.long_batch, args.long_mean, args.long_tokens)
    params = [SamplingParams(max_tokens=args.long_tokens, ignore_eos=True, temperature=1.0,
                             detokenize=False, stop_token_ids=[STOP_TOKEN],
                             extra_args={"stop_at": int(length)}) for length in lengths]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in teacher_prompts[:len(lengths)]],
                           params, use_tqdm=False)
    seconds = time.perf_counter() - start
    peak_file = Path(os.environ[PEAK_FILE_VARIABLE])
    counted = [int(metric.value) for metric in llm.get_metrics()
               if "preemption" in metric.name and hasattr(metric, "value")]
    figures = long_figures(lengths, args.long_tokens,
                           [len(o.outputs[0].token_ids) for o in outputs], seconds,
                           int(peak_file.read_text()) if peak_file.exists() else 0,
                           sum(counted) if counted else None)
    logger.info("%s: %.0f tok/s, %.0f s", args.arm, figures["tok_per_s"], seconds)
    return figures


def check_kernels() -> dict:
    """Fused kernels against the torch path on one step of real-size random logits."""
    import torch

    import sampler.mixing as mixing

    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 256, 151_936
    teacher = (torch.randn(rows, 152_064, device="cuda", generator=generator) * 4).bfloat16()
    theta = (0.5 * teacher[:, :vocab].float() + torch.randn(rows, vocab, device="cuda",
                                                  generator=generator) * 3).bfloat16()
    config = mixing.MixingConfig(alpha_method="kl_symmetry")
    keys = torch.as_tensor(mixing.draw_keys(1, np.arange(rows), np.zeros(rows, np.int64)),
                           device="cuda")
    graphed = mixing.GraphedMixing(vocab, rows)
    steps = {"fused": lambda: mixing.mix_and_draw(teacher, theta, vocab, config, keys),
             "torch": lambda: mixing.mix_and_draw(teacher, theta, vocab, config, keys),
             "graphed": lambda: graphed(teacher, theta, None, config, keys)[0]}
    timings, host_ms, draws = {}, {}, {}
    for backend, step in steps.items():
        mixing.BACKEND = "torch" if backend == "torch" else "fused"
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host_start = time.perf_counter()
        start.record()
        for _ in range(20):
            draws[backend] = step()
        stop.record()
        host_ms[backend] = 1e3 * (time.perf_counter() - host_start) / 20
        torch.cuda.synchronize()
        timings[backend] = start.elapsed_time(stop) / 20
    mixing.BACKEND = "auto"
    log_t = mixing.tempered_log_probs(teacher, vocab, 1.0)
    log_s = mixing.tempered_log_probs(theta, vocab, 1.0)
    fused = draws["fused"]
    log_q = mixing.mixture_log_probs(log_t, log_s, fused.alpha, config)
    picked = fused.token_ids[:, None]
    return {"rows": rows, "vocab": vocab, "ms_per_step": timings,
            "host_ms_per_step": host_ms,
            "graphed_equals_fused": bool(
                torch.equal(draws["graphed"].token_ids, fused.token_ids)
                and torch.equal(draws["graphed"].alpha, fused.alpha)),
            "max_abs_alpha_difference": float((fused.alpha - draws["torch"].alpha).abs().max()),
            "max_abs_log_q_difference": float(
                (fused.log_q - log_q.gather(1, picked).squeeze(1)).abs().max())}


def check_stops(pair, requests, config) -> dict:
    """Stop tokens taken from an unstopped run make pairs stop at different steps; every
    token is still checked in lockstep, and each trace ends where its engine stopped it."""
    probe = pair.generate(requests(64, 64), config, seed=3, show_progress=False)
    stops = sorted({int(probe[i].columns[20, 0]) for i in range(32)})
    checked_before = pair.tokens_checked
    traces = pair.generate(requests(64, 64), config, seed=3, show_progress=False,
                           stop_token_ids=stops)
    lengths = [len(t.columns) for t in traces.values()]
    consistent = all(
        (t.finish_reason == "stop" and int(t.columns[-1, 0]) in stops and len(t.columns) <= 64)
        or (t.finish_reason == "length" and len(t.columns) == 64) for t in traces.values())
    return {"stop_tokens": len(stops), "sequences": len(traces),
            "stopped_early": sum(t.finish_reason == "stop" for t in traces.values()),
            "min_length": min(lengths), "traces_consistent": consistent,
            "tokens_recorded": sum(lengths),
            "tokens_checked": pair.tokens_checked - checked_before}


def _busy_ms(trace_path: Path) -> float:
    """Milliseconds in which the device ran a kernel, copy or fill (union over streams)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


def measure_device_busy(pair, requests, config, batch: int) -> dict:
    """Device-busy time of a decode step (the physical limit: both forwards, the mixing and
    the forced sampling, with no host gaps), from two profiled runs that differ only in
    length, so the prefill step cancels."""
    import torch

    lengths, busy, steps = (32, 96), [], []
    try:
        for length in lengths:
            before = pair.steps_run
            with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
                pair.generate(requests(batch, length), config, seed=4, show_progress=False)
                torch.cuda.synchronize()
            steps.append(pair.steps_run - before)
            trace = Path(f"/tmp/device-busy-{length}.json")
            profiler.export_chrome_trace(str(trace))
            busy.append(_busy_ms(trace))
    except Exception as error:  # noqa: BLE001 - a diagnostic; the run's figures stand without it
        logger.exception("device-busy profile failed")
        return {"error": repr(error)}
    per_step = (busy[1] - busy[0]) / (steps[1] - steps[0])
    return {"batch": batch, "runs_new_tokens": lengths, "steps": steps, "busy_ms": busy,
            "decode_busy_ms_per_step": per_step, "limit_tok_per_s": 1e3 * batch / per_step}


def profile_host(pair, requests, config, top: int = 25) -> dict:
    """One run under cProfile: where the main process spends its time, in ms a step (the
    profiler slows Python code, so shares matter, not totals)."""
    profiler = cProfile.Profile()
    steps_before = pair.steps_run
    profiler.enable()
    pair.generate(requests, config, seed=3, show_progress=False)
    profiler.disable()
    steps = pair.steps_run - steps_before
    stats = pstats.Stats(profiler).stats
    busiest = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {"steps": steps, "functions": [
        {"function": f"{Path(file).name}:{line}:{name}", "calls_per_step": calls / steps,
         "own_ms_per_step": 1e3 * own / steps, "cumulative_ms_per_step": 1e3 * cumulative / steps}
        for (file, line, name), (_, calls, own, cumulative, _) in busiest]}


def engine_waits(pair) -> dict[str, float]:
    """Seconds each engine has waited: an engine process for each kind of reply, an engine
    in this process for its sampled tokens."""
    waits = {}
    for role, engine in (("teacher", pair.teacher), ("theta", pair.theta)):
        by_reply = getattr(engine, "wait_seconds_by_reply", None) or {
            "sampled_tokens": engine.wait_seconds}
        waits.update({f"{role}_waits_for_{reply}": seconds for reply, seconds in by_reply.items()})
    return waits


def timed_phases(pair, requests, config, synchronise: bool) -> tuple[dict, int, dict]:
    """One run with each phase timed (see `LockstepPair.enable_phase_timing`): ms a step of
    each phase and of the wall clock, the steps, and the traces."""
    pair.enable_phase_timing(synchronise)
    steps_before = pair.steps_run
    start = time.perf_counter()
    traces = pair.generate(requests, config, seed=2, show_progress=False)
    wall = time.perf_counter() - start
    steps = pair.steps_run - steps_before
    phases = {name: 1e3 * value / steps for name, value in pair.phase_seconds.items()}
    phases["wall_per_step"] = 1e3 * wall / steps
    return phases, steps, traces


def host_phases(pair, requests, config) -> dict:
    """One run timing each phase's host time without synchronising the device (the steps
    overlap as unprofiled), each engine's waits, and where each engine process's time
    went, in ms a step."""
    waits_before = engine_waits(pair)
    workers_before = {role: engine.worker_seconds()
                      for role, engine in (("teacher", pair.teacher), ("theta", pair.theta))
                      if engine.remote}
    phases, steps, _ = timed_phases(pair, requests, config, synchronise=False)
    waits = {name: 1e3 * (seconds - waits_before.get(name, 0.0)) / steps
             for name, seconds in engine_waits(pair).items()}
    workers = {}
    for role, engine in (("teacher", pair.teacher), ("theta", pair.theta)):
        if engine.remote:
            after = engine.worker_seconds()
            workers[role] = {name: 1e3 * (seconds - workers_before[role].get(name, 0.0)) / steps
                             for name, seconds in after.items()}
    return {"steps": steps, "ms_per_step": {**phases, **waits},
            "engine_process_ms_per_step": workers}


def pair_engine_args(args: argparse.Namespace, spec: Arm, context: int
                     ) -> tuple[dict, dict, dict]:
    """Both engines' settings, each memory share the product's default split of
    --pair-share (`sampler.api.engine_memory_shares`), and that split's inputs."""
    from transformers import AutoConfig

    from sampler.api import device_memory_bytes, engine_footprint, engine_memory_shares

    shapes = PAIRS[args.pair]
    common = {**shared_engine_args(args), "max_model_len": context, "max_num_seqs": 256,
              "max_num_batched_tokens": max(16384, context)}
    engines = {"teacher": teacher_settings(args, spec, common), "theta": common}
    models = {"teacher": shapes.teacher, "theta": shapes.theta}
    footprints = {role: engine_footprint(AutoConfig.from_pretrained(Path(args.models) / model),
                                         engines[role]) for role, model in models.items()}
    total = device_memory_bytes()
    split = engine_memory_shares(args.pair_share, total, *footprints.values())
    described = {"pair_share": args.pair_share, "device_gib": total / 2**30,
                 **{role: {"share": share, "weight_gib": footprints[role].weight_bytes / 2**30,
                           "kv_bytes_per_token": footprints[role].kv_bytes_per_token}
                    for role, share in zip(models, split)}}
    return ({**engines["teacher"], "gpu_memory_utilization": split.teacher},
            {**engines["theta"], "gpu_memory_utilization": split.theta}, described)


def build_pair(args: argparse.Namespace, spec: Arm, context: int):
    """The arm's pair, and what it was built with: the memory split, each engine's KV cache
    as the engine reports it (a second engine in one process does not log its own), the
    settings. On the CPU build (--smoke) engine processes are left to the default (off),
    since they need CUDA."""
    import torch

    from sampler.lockstep import LockstepPair

    shapes = PAIRS[args.pair]
    teacher_args, theta_args, split = pair_engine_args(args, spec, context)
    on_cuda = torch.cuda.is_available()
    pair = LockstepPair.from_models(
        str(Path(args.models) / shapes.teacher), str(Path(args.models) / shapes.theta), None,
        [], teacher_args, theta_args, overlap_steps=spec.overlap,
        theta_process=spec.theta_process if on_cuda else None,
        teacher_process=spec.teacher_process and on_cuda)
    kv_cache = {role: {"blocks": engine.num_kv_blocks, "block_size": engine.block_size,
                       "tokens": engine.num_kv_blocks * engine.block_size}
                for role, engine in (("teacher", pair.teacher), ("theta", pair.theta))}
    return pair, {"memory_split": split, "kv_cache": kv_cache,
                  "engine_args": {"teacher": teacher_args, "theta": theta_args}}


def save_columns(path: str, traces) -> None:
    """Every trace's columns, for `compare_modes`."""
    np.savez(path, **{str(i): trace.columns for i, trace in traces.items()})


def run_mixed(args: argparse.Namespace) -> dict:
    import torch

    from sampler.lockstep import PairRequest
    from sampler.mixing import MixingConfig

    spec = ARM_SPECS[args.arm]
    profiled = spec.profiled and not args.lean
    on_cuda = torch.cuda.is_available()
    kernels = check_kernels() if args.arm == "mixed" and profiled and on_cuda else None
    # the stop-token run takes 64 rows whatever the batches
    teacher_prompts, theta_prompts = make_prompts(max(args.batches + [64]))
    pair, described = build_pair(args, spec, 1024)
    config = MixingConfig(alpha_method="kl_symmetry")

    def requests(batch: int, new_tokens: int) -> list[PairRequest]:
        return [PairRequest(i, teacher_prompts[i], theta_prompts[i], new_tokens)
                for i in range(batch)]

    pair.generate(requests(8, 16), config, seed=0, show_progress=False)
    results, record = {}, {}
    for batch in args.batches:
        waited_before = pair.teacher.wait_seconds + pair.theta.wait_seconds
        steps_before = pair.steps_run
        start = time.perf_counter()
        traces = pair.generate(requests(batch, args.new_tokens), config, seed=1,
                               show_progress=False)
        seconds = time.perf_counter() - start
        steps = pair.steps_run - steps_before
        waited = pair.teacher.wait_seconds + pair.theta.wait_seconds - waited_before
        tokens = sum(len(t.columns) for t in traces.values())
        results[str(batch)] = {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
                               "steps": steps, "wall_ms_per_step": 1e3 * seconds / steps,
                               "host_busy_ms_per_step": 1e3 * (seconds - waited) / steps,
                               "host_waiting_for_device_ms_per_step": 1e3 * waited / steps}
        logger.info("%s %s batch %d: %.0f tok/s", args.arm, args.pair, batch, tokens / seconds)
        if batch == min(args.batches):
            save_columns(args.columns, traces)
            record = {str(i): {"teacher_prompt": teacher_prompts[i],
                               "theta_prompt": theta_prompts[i],
                               "columns": traces[i].columns.tolist()}
                      for i in range(min(CHECKED_SEQUENCES, batch))}
            Path(args.record).write_text(json.dumps(record))
            if profiled:
                repeat = pair.generate(requests(batch, args.new_tokens), config, seed=1,
                                       show_progress=False)
                results[str(batch)]["repeat_identical_sequences"] = sum(
                    np.array_equal(traces[i].columns[:, 0], repeat[i].columns[:, 0])
                    for i in traces)
    figures = {"overlapped_steps": pair.overlapped, "throughput": results, **described}
    if profiled:
        figures.update(profile_mixed(pair, requests, config, args, on_cuda), kernels=kernels)
    figures["tokens_checked_in_lockstep"] = pair.tokens_checked
    pair.shutdown()
    return {**figures, **gpu_facts()}


def profile_mixed(pair, requests, config, args: argparse.Namespace, on_cuda: bool) -> dict:
    """The profiled arms' diagnostics after their timed runs (see the module docstring)."""
    largest = max(args.batches)
    figures = {"stop_tokens_run": check_stops(pair, requests, config),
               "host_profile": profile_host(pair, requests(largest, 128), config)}
    if pair.teacher.remote or pair.theta.remote:
        # Synchronised phases and the profiler see this process's device work only.
        figures["host_phases"] = host_phases(pair, requests(largest, 256), config)
        return figures
    if pair.overlapped and on_cuda:
        figures["device_busy"] = measure_device_busy(pair, requests, config, largest)
    phases_ms, steps, traces = timed_phases(pair, requests(largest, 256), config,
                                            synchronise=True)
    alphas = np.concatenate([t.columns[:, 1] for t in traces.values()])
    figures["profile"] = {"batch": largest, "new_tokens": 256, "steps": steps,
                          "ms_per_step": phases_ms}
    figures["alpha"] = {"mean": float(alphas.mean()), "min": float(alphas.min()),
                        "max": float(alphas.max())}
    return figures


def force_pair_stops(pair, lengths: np.ndarray) -> dict[str, int]:
    """Benchmark-only (mixed_long), the pair's counterpart of `ForcedStop`: wraps the pair's
    mixing so that pair i draws `STOP_TOKEN` as its `lengths[i]`-th token and never before
    (the stop column of both models' logits masked, the drawn token and its record
    replaced at that position). A row's position is the lockstep's own (the tokens drawn
    for it so far, as it passes them to `draw_keys`), so a preempted and resumed pair stops
    where it would have. Returns the peak concurrent sequences seen, filled in as it runs."""
    import torch

    import sampler.lockstep as lockstep

    seen = {"peak_concurrent_sequences": 0}
    positions: dict[str, np.ndarray] = {}
    keys_of, mix = lockstep.draw_keys, pair._mix

    def draw_keys_noting_positions(seed, row_keys, drawn):
        positions["drawn"] = np.asarray(drawn)
        return keys_of(seed, row_keys, drawn)

    @torch.inference_mode()   # the engines' logits are inference tensors
    def mix_with_stops(teacher_logits, theta_logits, alignment, *rest):
        teacher_logits[:, STOP_TOKEN] = float("-inf")
        theta_logits[:, STOP_TOKEN] = float("-inf")
        draw, record = mix(teacher_logits, theta_logits, alignment, *rest)
        pairs = alignment.pair_indices
        seen["peak_concurrent_sequences"] = max(seen["peak_concurrent_sequences"], len(pairs))
        due = np.flatnonzero(positions["drawn"] == lengths[pairs] - 1)
        if due.size:
            rows = torch.as_tensor(due, device=draw.token_ids.device)
            draw.token_ids[rows] = STOP_TOKEN
            record[rows, 0] = STOP_TOKEN
        return draw, record

    lockstep.draw_keys = draw_keys_noting_positions
    pair._mix = mix_with_stops
    return seen


def run_mixed_long(args: argparse.Namespace) -> dict:
    from sampler.lockstep import PairRequest
    from sampler.mixing import MixingConfig

    teacher_prompts, theta_prompts = make_prompts(args.long_batch)
    lengths = long_lengths(args.long_batch, args.long_mean, args.long_tokens)
    pair, described = build_pair(args, ARM_SPECS[args.arm], PROMPT_ROOM + args.long_tokens)
    config = MixingConfig(alpha_method="kl_symmetry")
    pair.generate([PairRequest(i, teacher_prompts[i], theta_prompts[i], 16) for i in range(8)],
                  config, seed=0, show_progress=False)
    seen = force_pair_stops(pair, lengths)
    requests = [PairRequest(i, teacher_prompts[i], theta_prompts[i], args.long_tokens)
                for i in range(args.long_batch)]
    steps_before, preempted = pair.steps_run, pair.preemptions
    start = time.perf_counter()
    traces = pair.generate(requests, config, seed=1, show_progress=False,
                           stop_token_ids=[STOP_TOKEN])
    seconds = time.perf_counter() - start
    figures = long_figures(lengths, args.long_tokens,
                           [len(traces[i].columns) for i in range(len(lengths))], seconds,
                           seen["peak_concurrent_sequences"], pair.preemptions - preempted)
    figures["steps"] = pair.steps_run - steps_before
    logger.info("%s: %.0f tok/s, %.0f s", args.arm, figures["tok_per_s"], seconds)
    pair.shutdown()
    return {"long": figures, **described, **gpu_facts()}


def first_difference(tokens: list[int], theirs: list[int]) -> int:
    """How many leading tokens two sequences share."""
    differing = [i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b]
    return differing[0] if differing else min(len(tokens), len(theirs))


def compare_modes(work: Path, pair_name: str, reference: str, other: str) -> dict:
    """The smallest batch's sequences of two arms, one by one: how many are identical, how
    many tokens they share, and while the tokens agree the largest and mean |difference|
    of each recorded value (which engine's forward pass, or the mixing, differs)."""
    from sampler.mixing import TRACE_COLUMNS

    paths = [work / f"{pair_name}-{arm}-columns.npz" for arm in (reference, other)]
    if not all(path.exists() for path in paths):
        return {"error": "an arm did not record its sequences"}
    ours, others = (dict(np.load(path)) for path in paths)
    largest, total = np.zeros(len(TRACE_COLUMNS) - 1), np.zeros(len(TRACE_COLUMNS) - 1)
    agreeing, identical = [], 0
    for key, mine in ours.items():
        theirs = others.get(key, np.zeros((0, len(TRACE_COLUMNS))))
        agree = first_difference(mine[:, 0].tolist(), theirs[:, 0].tolist())
        identical += np.array_equal(mine[:, 0], theirs[:, 0])
        agreeing.append(agree)
        if agree:
            difference = np.abs(mine[:agree, 1:] - theirs[:agree, 1:])
            largest = np.maximum(largest, difference.max(axis=0))
            total += difference.sum(axis=0)
    compared = int(sum(agreeing))
    return {"sequences": len(ours), "identical": int(identical),
            "mean_tokens_before_first_difference": float(np.mean(agreeing)),
            "tokens_compared": compared,
            "largest_difference_while_tokens_agree": dict(zip(TRACE_COLUMNS[1:],
                                                              largest.tolist())),
            "mean_difference_while_tokens_agree": dict(zip(
                TRACE_COLUMNS[1:], (total / max(compared, 1)).tolist()))}


def run_check(args: argparse.Namespace) -> dict:
    """Recompute log t(y), log θ(y) with transformers (bf16 weights, fp32 log-softmax;
    float32 weights on the CPU with --smoke, as its engines)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sampler.mixing import TRACE_COLUMNS

    record = json.loads(Path(args.record).read_text())
    shapes, deviations = PAIRS[args.pair], {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    for role, name, prompt_key, column in (
            ("teacher", shapes.teacher, "teacher_prompt", TRACE_COLUMNS.index("log_teacher")),
            ("theta", shapes.theta, "theta_prompt", TRACE_COLUMNS.index("log_theta"))):
        model = AutoModelForCausalLM.from_pretrained(str(Path(args.models) / name),
                                                     dtype=dtype).to(device).eval()
        errors = []
        for item in record.values():
            columns = np.asarray(item["columns"])
            generated = columns[:, 0].astype(np.int64).tolist()
            ids = torch.tensor([item[prompt_key] + generated], device=device)
            with torch.no_grad():
                logits = model(ids).logits[0, len(item[prompt_key]) - 1:-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            recomputed = log_probs.gather(1, torch.tensor(generated, device=device)[:, None])
            errors.append(np.abs(recomputed.squeeze(1).cpu().numpy() - columns[:, column]))
        every = np.concatenate(errors)
        deviations[role] = {"max_abs": float(every.max()), "mean_abs": float(every.mean()),
                            "tokens": int(every.size)}
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return deviations


#: What each engine logs of its memory, in the order the engines start (teacher first).
ENGINE_LOG_FACTS = {"weights_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
                    "kv_cache_gib": re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
                    "kv_cache_tokens": re.compile(r"KV cache size: ([\d,]+) tokens")}


def engine_log_facts(log: str) -> dict[str, list[float]]:
    return {name: [float(value.replace(",", "")) for value in pattern.findall(log)]
            for name, pattern in ENGINE_LOG_FACTS.items()}


def run_arm_in_subprocess(arm: str, pair_name: str, args: argparse.Namespace) -> dict:
    out = Path(args.work)
    result_path = out / f"{pair_name}-{arm}.json"
    # The check recomputes the record of the first compared arm this invocation ran.
    record_arm = arm if arm != "check" else next(
        (a for a in COMPARED_ARMS if (out / f"{pair_name}-{a}-record.json").exists()), "mixed")
    command = [sys.executable, __file__, "--arm", arm, "--pair", pair_name,
               "--models", args.models, "--out", args.out, "--work", args.work,
               "--result", str(result_path),
               "--record", str(out / f"{pair_name}-{record_arm}-record.json"),
               "--columns", str(out / f"{pair_name}-{arm}-columns.npz"),
               "--new-tokens", str(args.new_tokens),
               "--batches", ",".join(map(str, args.batches)),
               "--long-tokens", str(args.long_tokens), "--long-mean", str(args.long_mean),
               "--long-batch", str(args.long_batch), "--pair-share", str(args.pair_share),
               *(["--smoke"] if args.smoke else []), *(["--lean"] if args.lean else [])]
    environment = {**os.environ, PEAK_FILE_VARIABLE: str(out / f"{pair_name}-{arm}-peak"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                               os.environ.get("PYTHONPATH")]))}
    logger.info("running %s for %s", arm, pair_name)
    start = time.perf_counter()
    log_path = out / f"{pair_name}-{arm}.log"
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    log_text = log_path.read_text()
    if code != 0 or not result_path.exists():
        tail = log_text[-3000:]
        logger.error("%s for %s failed (exit %d):\n%s", arm, pair_name, code, tail)
        return {"error": f"exit {code}", "log_tail": tail, "engine_log": engine_log_facts(log_text)}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - start
    result["engine_log"] = engine_log_facts(log_text)
    if arm == "check":
        result["recomputed_arm"] = record_arm
    return result


def summarise(results: dict, args: argparse.Namespace) -> str:
    """One table of the batch arms (each rate and its ratio to plain vLLM's with the same
    teacher) and one of the long arms."""
    lines = ["| pair | batch | arm | tok/s | against plain vLLM |", "|---|---|---|---|---|"]
    for pair_name, arms in results["pairs"].items():
        for batch in map(str, args.batches):
            for arm, spec in ARM_SPECS.items():
                rate = arms.get(arm, {}).get("throughput", {}).get(batch, {}).get("tok_per_s")
                if rate is None:
                    continue
                plain = "baseline_fp8" if spec.teacher_args == FP8 else "baseline"
                base = arms.get(plain, {}).get("throughput", {}).get(batch, {}).get("tok_per_s")
                ratio = f"{rate / base:.2f}× {plain}" if base and spec.pair else "-"
                lines.append(f"| {pair_name} | {batch} | {arm} | {rate:,.0f} | {ratio} |")
        for arm in ("baseline_long", "mixed_long"):
            long = arms.get(arm, {}).get("long")
            if long:
                lines.append(f"| {pair_name} | {long['rows']} × ≤{long['max_tokens_each']} "
                             f"| {arm} | {long['tok_per_s']:,.0f} | {long['seconds']:.0f} s, "
                             f"peak {long['peak_concurrent_sequences']} sequences, "
                             f"{long['preemptions']} preemptions |")
    return "\n".join(lines)


def run_arm(args: argparse.Namespace) -> dict:
    """This process's one arm (--arm)."""
    if args.arm == "check":
        return run_check(args)
    spec = ARM_SPECS[args.arm]
    if not spec.pair:
        return run_baseline(args)
    return run_mixed_long(args) if spec.long else run_mixed(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--work", default="/tmp/benchmark-work")
    parser.add_argument("--pairs", default="7b_0.5b,1.5b_0.5b")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--long-mean", type=float, default=3000.0)
    parser.add_argument("--long-batch", type=int, default=256)
    parser.add_argument("--pair-share", type=float, default=None,
                        help="the pair's share of device memory (default: OptimalSamplingV1's)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--lean", action="store_true",
                        help="timed runs only: no repeat, stop-token run or profiles")
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU build: tiny random checkpoints, few rows and tokens")
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument("--pair", choices=sorted(PAIRS))
    parser.add_argument("--result")
    parser.add_argument("--record")
    parser.add_argument("--columns")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.pair_share is None:
        from sampler.api import DEFAULT_GPU_MEMORY_UTILIZATION

        args.pair_share = 0.1 if args.smoke else DEFAULT_GPU_MEMORY_UTILIZATION
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.arm:
        Path(args.result).write_text(json.dumps(run_arm(args), indent=1))
        return
    if args.smoke:
        apply_smoke_settings(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    pair_names = args.pairs.split(",")
    write_checkpoints(Path(args.models), {name for pair in pair_names for name in
                                          (PAIRS[pair].teacher, PAIRS[pair].theta)}, args.smoke)
    results = {"command": " ".join(sys.argv), "pairs": {}}
    for pair_name in pair_names:
        arms = results["pairs"][pair_name] = {}
        # Sequences and records compared below come from this invocation's arms only.
        for stale in Path(args.work).glob(f"{pair_name}-*"):
            stale.unlink()
        for arm in args.arms.split(","):
            arms[arm] = run_arm_in_subprocess(arm, pair_name, args)
            Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
        compared = [arm for arm in COMPARED_ARMS if arm in arms]
        compared.sort(key=list(arms).index)
        if len(compared) > 1:
            arms["modes_compared"] = {
                f"{compared[0]} and {other}": compare_modes(Path(args.work), pair_name,
                                                           compared[0], other)
                for other in compared[1:]}
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    table = summarise(results, args)
    Path(args.out, "results.md").write_text(table + "\n")
    logger.info("results in %s:\n%s", args.out, table)


def apply_smoke_settings(args: argparse.Namespace) -> None:
    """--smoke on the CPU build: tiny checkpoints under --work, few rows and tokens, 1 GiB of
    KV cache an engine, one core for an engine on the multiprocess executor."""
    args.models = str(Path(args.work) / "smoke-models")
    args.new_tokens, args.batches = 16, [8]
    args.long_tokens, args.long_mean, args.long_batch = 64, 24.0, 8
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
