"""Throughput of one run's shards over 1 GPU against N GPUs, one engine pair per GPU.

This is the work the pipeline's GPU workers do (tasks/fan_out.py, flows/shard_worker.py):
the shards are dealt round-robin, one share per GPU; each worker process is pinned to its
GPU with CUDA_VISIBLE_DEVICES, builds its pair once and generates its shards one after
another. Prefect is not installed on the GPU machine, so the workers here are plain
processes started by this script; the orchestration around them (child flow runs, polling)
is tested on the CPU in tests/test_fan_out.py and costs seconds a run.

    python benchmarks/multi_gpu.py --models /tmp/models --layouts 1,2 --out $OUT

Layouts: `N` runs N workers, each given its slice of the host's cores (CPU affinity and
OMP_NUM_THREADS = cores / N, as deployments/start-gpu-workers.sh does); `N-shared` runs N
workers that share every core. Each worker reports its engine build time, its generation
time and a hash of every shard's tokens, so the layouts' shards can be compared.
Results: results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
logger = logging.getLogger("multi_gpu")

ENGINE_ARGS = {"skip_tokenizer_init": True, "max_model_len": 1024, "max_num_seqs": 256,
               "max_num_batched_tokens": 16384}


def shard_prompts(prompts: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, prompts))
            for start in range(0, prompts, shard_size)]


def run_worker(args: argparse.Namespace) -> None:
    """One GPU's share: build the pair, then generate shards index, index + N, ..."""
    from benchmarks.throughput import make_prompts
    from sampler.lockstep import LockstepPair, PairRequest
    from sampler.mixing import MixingConfig

    started = time.perf_counter()
    teacher_prompts, theta_prompts = make_prompts(args.prompts)
    pair = LockstepPair.from_models(
        str(Path(args.models) / args.teacher), str(Path(args.models) / args.theta), None, [],
        {**ENGINE_ARGS, "gpu_memory_utilization": 0.55},
        {**ENGINE_ARGS, "gpu_memory_utilization": 0.3}, theta_process=False)
    config = MixingConfig(alpha_method="kl_symmetry")
    pair.generate([PairRequest(0, teacher_prompts[0], theta_prompts[0], 16)], config, seed=0,
                  show_progress=False)
    built = time.perf_counter()
    shards = shard_prompts(args.prompts, args.shard_size)[args.worker::args.of]
    tokens, hashes = 0, {}
    for shard in shards:
        requests = [PairRequest(i, teacher_prompts[i], theta_prompts[i], args.new_tokens)
                    for i in shard]
        traces = pair.generate(requests, config, seed=shard.start, show_progress=False)
        ids = [traces[i].columns[:, 0].astype(int).tolist() for i in shard]
        tokens += sum(len(row) for row in ids)
        hashes[str(shard.start)] = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    finished = time.perf_counter()
    Path(args.result).write_text(json.dumps({
        "worker": args.worker, "cores": sorted(os.sched_getaffinity(0)),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"), "build_s": built - started,
        "generate_s": finished - built, "tokens": tokens, "shards": len(shards),
        "shard_hashes": hashes}))


def run_layout(layout: str, args: argparse.Namespace, work: Path) -> dict:
    """Start the layout's workers at once; figures over the slowest worker's wall time."""
    workers = int(layout.split("-")[0])
    split_host = not layout.endswith("-shared")
    cores = sorted(os.sched_getaffinity(0))
    processes = []
    start = time.perf_counter()
    for index in range(workers):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(index)}
        mine = cores[index * len(cores) // workers:(index + 1) * len(cores) // workers]
        if split_host:
            env["OMP_NUM_THREADS"] = str(len(mine))
        command = [sys.executable, __file__, "--worker", str(index), "--of", str(workers),
                   "--result", str(work / f"{layout}-{index}.json"),
                   "--models", args.models, "--teacher", args.teacher, "--theta", args.theta,
                   "--prompts", str(args.prompts), "--shard-size", str(args.shard_size),
                   "--new-tokens", str(args.new_tokens)]
        if split_host:
            command = ["taskset", "-c", ",".join(map(str, mine)), *command]
        log = (work / f"{layout}-{index}.log").open("w")
        processes.append(subprocess.Popen(command, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    codes = [process.wait() for process in processes]
    wall = time.perf_counter() - start
    if any(codes):
        tails = {i: (work / f"{layout}-{i}.log").read_text()[-3000:] for i in range(workers)}
        return {"error": f"exit codes {codes}", "log_tails": tails}
    reports = [json.loads((work / f"{layout}-{i}.json").read_text()) for i in range(workers)]
    tokens = sum(report["tokens"] for report in reports)
    generating = max(report["generate_s"] for report in reports)
    return {"workers": workers, "host_split": split_host, "wall_s": wall, "tokens": tokens,
            "tok_per_s_wall": tokens / wall, "tok_per_s_generating": tokens / generating,
            "build_s": [report["build_s"] for report in reports],
            "generate_s": [report["generate_s"] for report in reports],
            "shard_hashes": {k: v for report in reports
                             for k, v in report["shard_hashes"].items()}, "reports": reports}


def summarize(results: dict[str, dict], baseline: str) -> str:
    """results.md: each layout against the one-GPU layout of the same run."""
    base = results.get(baseline, {})
    lines = ["| layout | GPUs | tokens | wall s | tok/s (wall) | × 1 GPU | tok/s (generating) "
             "| × 1 GPU | engine build s | shards identical to 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for layout, result in results.items():
        if "error" in result:
            lines.append(f"| {layout} | failed: {result['error']} |")
            continue
        same = sum(result["shard_hashes"].get(k) == v
                   for k, v in base.get("shard_hashes", {}).items())
        measured = "tok_per_s_wall" in base        # the one-GPU layout may have failed
        ratio_wall = result["tok_per_s_wall"] / base["tok_per_s_wall"] if measured else math.nan
        ratio_gen = (result["tok_per_s_generating"] / base["tok_per_s_generating"]
                     if measured else math.nan)
        lines.append(
            f"| {layout} | {result['workers']} | {result['tokens']:,} | {result['wall_s']:.0f} "
            f"| {result['tok_per_s_wall']:,.0f} | {ratio_wall:.2f} "
            f"| {result['tok_per_s_generating']:,.0f} | {ratio_gen:.2f} "
            f"| {', '.join(f'{b:.0f}' for b in result['build_s'])} "
            f"| {same} of {len(base.get('shard_hashes', {}))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--teacher", default="qwen2.5-7b")
    parser.add_argument("--theta", default="qwen2.5-0.5b")
    parser.add_argument("--layouts", default="1,2")
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--out", default=os.environ.get("OUT", "multi-gpu-results"))
    parser.add_argument("--worker", type=int, default=None)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--result", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker is not None:
        run_worker(args)
        return
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    layouts = args.layouts.split(",")
    for layout in layouts:
        logger.info("layout %s", layout)
        results[layout] = run_layout(layout, args, work)
        (out / "results.json").write_text(json.dumps(
            {"settings": vars(args), "layouts": results}, indent=1))
    table = summarize(results, layouts[0])
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
