"""Throughput of mixed sampling against plain vLLM teacher-only generation, side by side.

One command runs every arm and size on the GPU machine; each arm runs in its own process
(a plain `vllm.LLM` with its defaults cannot share the card with the engine pair):

    python benchmarks/throughput.py --models /tmp/models --out $OUT

Arms, on the same token-id prompts (theta prompt 150–300 tokens, teacher prompt the same
plus 50–100 more), 512 new tokens ignoring EOS, batch 64 and 256:
- baseline: `vllm.LLM.generate` of the teacher with vLLM's default settings;
- mixed: the lockstep pair with kl_symmetry, steps overlapped (async scheduling); first the
  fused mixing kernels against the torch path on random logits of the real size; after the
  timed runs, the smallest batch again with the same seed (the sequences that repeat
  token for token are counted), one profiled run splitting step time into phases (device
  synchronised, so phases do not overlap there), a run with stop tokens (pairs stop one step
  before the scheduler learns of it), a record of a few sequences for the log-prob check,
  and a run under cProfile (the main process's busiest functions, ms a step);
- mixed_process: as mixed, with the theta engine in its own process (`sampler.engine_process`),
  so both engines' host work runs at once; mixed_processes: both engines in processes of
  their own, this one only mixing and checking. Each is profiled without synchronising the
  device: each phase's host time, waits for the engine processes' replies included, and
  where each worker's time goes;
- mixed_serial: the same pair with serial steps (no async scheduling), for comparison;
- every mixed arm's smallest-batch tokens are compared with those of the first of the
  mixed arms run, in the order above (for the recorded sequences also which engine's
  log-probs differ before the first differing token);
- check: transformers recomputes log t(y) and log θ(y) of the recorded sequences.
Results: results.json (every arm's figures, and a failed arm's log tail) and results.md under
--out; per-arm files and logs under --work.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
logger = logging.getLogger("benchmark")

PAIRS = {"7b_0.5b": ("qwen2.5-7b", "qwen2.5-0.5b"), "1.5b_0.5b": ("qwen2.5-1.5b", "qwen2.5-0.5b"),
         "smoke": ("qwen2.5-0.5b", "qwen2.5-0.5b")}
ARMS = ("baseline", "mixed", "mixed_process", "mixed_processes", "mixed_serial", "check")
#: The arms that run the engine pair with overlapped steps, each placed differently.
OVERLAPPED_ARMS = ("mixed", "mixed_process", "mixed_processes")
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


def gpu_facts() -> dict:
    import torch

    return {"card": torch.cuda.get_device_name(0),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def run_baseline(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    teacher_prompts, _ = make_prompts(max(args.batches))
    llm = LLM(model=str(Path(args.models) / args.teacher), skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=1.0,
                            detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in teacher_prompts[:8]],
                 SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False))
    results = {}
    for batch in args.batches:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in teacher_prompts[:batch]], params,
                               use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results[str(batch)] = {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}
        logger.info("baseline %s batch %d: %.0f tok/s", args.teacher, batch, tokens / seconds)
    return {"throughput": results, **gpu_facts()}


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
    ranks = torch.arange(rows, device="cuda")
    graphed = mixing.GraphedMixing(vocab, rows)
    steps = {"fused": lambda: mixing.mix_and_draw(teacher, theta, vocab, config, 1, ranks),
             "torch": lambda: mixing.mix_and_draw(teacher, theta, vocab, config, 1, ranks),
             "graphed": lambda: graphed(teacher, theta, None, config, 1, ranks)[0]}
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


def run_mixed(args: argparse.Namespace) -> dict:
    from sampler.lockstep import LockstepPair, PairRequest
    from sampler.mixing import MixingConfig

    overlap = args.arm in OVERLAPPED_ARMS
    theta_process = args.arm in ("mixed_process", "mixed_processes")
    teacher_process = args.arm == "mixed_processes"
    in_process = not (theta_process or teacher_process)
    kernels = check_kernels() if args.arm == "mixed" else None
    teacher_prompts, theta_prompts = make_prompts(max(args.batches))
    common = {"skip_tokenizer_init": True, "max_model_len": 1024, "max_num_seqs": 256,
              "max_num_batched_tokens": 16384}
    pair = LockstepPair.from_models(
        str(Path(args.models) / args.teacher), str(Path(args.models) / args.theta), None, [],
        {**common, "gpu_memory_utilization": 0.55}, {**common, "gpu_memory_utilization": 0.3},
        overlap_steps=overlap, theta_process=theta_process, teacher_process=teacher_process)
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
        logger.info("%s %s+%s batch %d: %.0f tok/s", args.arm, args.teacher, args.theta, batch,
                    tokens / seconds)
        if batch == min(args.batches):
            repeat = pair.generate(requests(batch, args.new_tokens), config, seed=1,
                                   show_progress=False)
            results[str(batch)]["repeat_identical_sequences"] = sum(
                np.array_equal(traces[i].columns[:, 0], repeat[i].columns[:, 0]) for i in traces)
            record = {str(i): {"teacher_prompt": teacher_prompts[i],
                               "theta_prompt": theta_prompts[i],
                               "columns": traces[i].columns.tolist()}
                      for i in range(CHECKED_SEQUENCES)}
            Path(args.tokens).write_text(json.dumps(
                {str(i): t.columns[:, 0].astype(int).tolist() for i, t in traces.items()}))
    stops = check_stops(pair, requests, config)
    if overlap:
        Path(args.record).write_text(json.dumps(record))
    host_profile = profile_host(pair, requests(max(args.batches), 128), config)
    if not in_process:
        # Synchronised phases and the profiler see this process's device work only.
        phases = host_phases(pair, requests(max(args.batches), 256), config)
        pair.shutdown()
        return {"overlapped_steps": pair.overlapped, "throughput": results,
                "tokens_checked_in_lockstep": pair.tokens_checked, "stop_tokens_run": stops,
                "host_profile": host_profile, "host_phases": phases, **gpu_facts()}
    device_busy = measure_device_busy(pair, requests, config, max(args.batches)) \
        if overlap else None
    profile_batch, profile_tokens = max(args.batches), 256
    phases_ms, steps, traces = timed_phases(pair, requests(profile_batch, profile_tokens),
                                            config, synchronise=True)
    alphas = np.concatenate([t.columns[:, 1] for t in traces.values()])
    return {"overlapped_steps": pair.overlapped, "throughput": results,
            "tokens_checked_in_lockstep": pair.tokens_checked, "kernels": kernels,
            "stop_tokens_run": stops, "device_busy": device_busy, "host_profile": host_profile,
            "profile": {"batch": profile_batch, "new_tokens": profile_tokens, "steps": steps,
                        "ms_per_step": phases_ms},
            "alpha": {"mean": float(alphas.mean()), "min": float(alphas.min()),
                      "max": float(alphas.max())}, **gpu_facts()}


def first_difference(tokens: list[int], theirs: list[int]) -> int:
    """How many leading tokens two sequences share."""
    differing = [i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b]
    return differing[0] if differing else min(len(tokens), len(theirs))


def compare_modes(work: Path, pair_name: str, reference: str, other: str) -> dict:
    """The smallest batch's token sequences of two arms, one by one; for the recorded
    sequences, the largest difference of each recorded value while the tokens agree (which
    engine's forward pass, or the mixing, differs between the arms)."""
    paths = [work / f"{pair_name}-{arm}-tokens.json" for arm in (reference, other)]
    if not all(path.exists() for path in paths):
        return {"error": "an arm did not record its tokens"}
    ours, others = (json.loads(path.read_text()) for path in paths)
    agreeing = [first_difference(tokens, others.get(key, [])) for key, tokens in ours.items()]
    comparison = {"sequences": len(ours),
                  "identical": sum(a == b for a, b in ((ours[k], others.get(k)) for k in ours)),
                  "mean_tokens_before_first_difference": float(np.mean(agreeing))}
    records = [work / f"{pair_name}-{arm}-record.json" for arm in (reference, other)]
    if all(path.exists() for path in records):
        from sampler.mixing import TRACE_COLUMNS

        mine, theirs = (json.loads(path.read_text()) for path in records)
        largest, compared = np.zeros(len(TRACE_COLUMNS) - 1), 0
        for key, item in mine.items():
            a, b = np.asarray(item["columns"]), np.asarray(theirs[key]["columns"])
            agree = first_difference(a[:, 0].tolist(), b[:, 0].tolist())
            if agree:
                largest = np.maximum(largest, np.abs(a[:agree, 1:] - b[:agree, 1:]).max(axis=0))
            compared += agree
        comparison["recorded_tokens_compared"] = compared
        comparison["recorded_largest_difference_while_tokens_agree"] = dict(
            zip(TRACE_COLUMNS[1:], largest.tolist()))
    return comparison


def run_check(args: argparse.Namespace) -> dict:
    """Recompute log t(y), log θ(y) with transformers (bf16 weights, fp32 log-softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    record = json.loads(Path(args.record).read_text())
    deviations = {}
    for role, name, prompt_key, column in (("teacher", args.teacher, "teacher_prompt", 3),
                                          ("theta", args.theta, "theta_prompt", 4)):
        model = AutoModelForCausalLM.from_pretrained(str(Path(args.models) / name),
                                                     dtype=torch.bfloat16).cuda().eval()
        errors = []
        for item in record.values():
            columns = np.asarray(item["columns"])
            generated = columns[:, 0].astype(np.int64).tolist()
            ids = torch.tensor([item[prompt_key] + generated], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits[0, len(item[prompt_key]) - 1:-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            recomputed = log_probs.gather(1, torch.tensor(generated, device="cuda")[:, None])
            errors.append(np.abs(recomputed.squeeze(1).cpu().numpy() - columns[:, column]))
        every = np.concatenate(errors)
        deviations[role] = {"max_abs": float(every.max()), "mean_abs": float(every.mean()),
                            "tokens": int(every.size)}
        del model
        torch.cuda.empty_cache()
    return deviations


def run_arm_in_subprocess(arm: str, pair_name: str, args: argparse.Namespace) -> dict:
    teacher, theta = PAIRS[pair_name]
    out = Path(args.work)
    result_path = out / f"{pair_name}-{arm}.json"
    # The check recomputes the record of the first overlapped arm (in OVERLAPPED_ARMS order)
    # this invocation ran.
    record_arm = arm if arm != "check" else next(
        (a for a in OVERLAPPED_ARMS if (out / f"{pair_name}-{a}-record.json").exists()),
        "mixed")
    command = [sys.executable, __file__, "--arm", arm, "--teacher", teacher, "--theta", theta,
               "--models", args.models, "--out", args.out, "--work", args.work,
               "--result", str(result_path),
               "--record", str(out / f"{pair_name}-{record_arm}-record.json"),
               "--tokens", str(out / f"{pair_name}-{arm}-tokens.json"),
               "--new-tokens", str(args.new_tokens),
               "--batches", ",".join(map(str, args.batches))]
    logger.info("running %s for %s", arm, pair_name)
    start = time.perf_counter()
    with open(out / f"{pair_name}-{arm}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not result_path.exists():
        tail = (out / f"{pair_name}-{arm}.log").read_text()[-3000:]
        logger.error("%s for %s failed (exit %d):\n%s", arm, pair_name, code, tail)
        return {"error": f"exit {code}", "log_tail": tail}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - start
    if arm == "check":
        result["recomputed_arm"] = record_arm
    return result


def summarise(results: dict, args: argparse.Namespace) -> str:
    lines = ["| pair | batch | baseline tok/s | mixed tok/s | ratio | theta process tok/s | ratio "
             "| engine processes tok/s | ratio | serial steps tok/s | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pair_name, arms in results["pairs"].items():
        for batch in map(str, args.batches):
            cells = [pair_name, batch]
            base = arms.get("baseline", {}).get("throughput", {}).get(batch, {}).get("tok_per_s")
            cells.append(f"{base:,.0f}" if base else "-")
            for arm in (*OVERLAPPED_ARMS, "mixed_serial"):
                rate = arms.get(arm, {}).get("throughput", {}).get(batch, {}).get("tok_per_s")
                cells.append(f"{rate:,.0f}" if rate else "-")
                cells.append(f"{rate / base:.2f}" if rate and base else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--work", default="/tmp/benchmark-work")
    parser.add_argument("--pairs", default="7b_0.5b,1.5b_0.5b")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument("--teacher")
    parser.add_argument("--theta")
    parser.add_argument("--result")
    parser.add_argument("--record")
    parser.add_argument("--tokens")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.arm:
        arm = run_baseline if args.arm == "baseline" else \
            run_check if args.arm == "check" else run_mixed
        Path(args.result).write_text(json.dumps(arm(args), indent=1))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(sys.argv), "pairs": {}}
    for pair_name in args.pairs.split(","):
        arms = results["pairs"][pair_name] = {}
        # Tokens and records compared below come from this invocation's arms only.
        for stale in Path(args.work).glob(f"{pair_name}-*.json"):
            stale.unlink()
        for arm in args.arms.split(","):
            arms[arm] = run_arm_in_subprocess(arm, pair_name, args)
            Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
        mixed_arms = [arm for arm in (*OVERLAPPED_ARMS, "mixed_serial") if arm in arms]
        if len(mixed_arms) > 1:
            arms["modes_compared"] = {
                f"{mixed_arms[0]} and {other}": compare_modes(Path(args.work), pair_name,
                                                             mixed_arms[0], other)
                for other in mixed_arms[1:]}
        Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
    table = summarise(results, args)
    Path(args.out, "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
