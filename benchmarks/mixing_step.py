"""Device time of one mixing step, per α method, batch shape, logits dtype and kind of input.

The step is the public path, `sampler.mixing.mix_and_draw` (on CUDA the fused kernels where
they apply: log normalisers, `solve_alpha`, draw; `entropy` always runs the torch code),
its CUDA-graph replay (`GraphedMixing`, what the lockstep runs) and the torch code for
reference. Two kinds of input: independent random teacher and theta logits (models that
disagree: the float32 tier of the solver settles every row) and near-identical ones
(theta = teacher × (1 + 1e-6): every row also takes the float64 tier). For the solved
methods the share of rows left to float64 is reported too.

    python benchmarks/mixing_step.py             # on a GPU: JSON to stdout, $OUT/mixing_step.json
    python benchmarks/mixing_step.py --smoke     # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
logger = logging.getLogger("mixing_step")

METHODS = ("kl_symmetry", "ess_balance", "entropy", "fixed")
SHAPES = ((256, 152_064), (64, 152_064))
SMOKE_SHAPES = ((4, 1024), (2, 1024))
DTYPES = ("bfloat16", "float32")
INPUTS = ("independent", "near_identical")
#: Typical spread of a language model's logits (nats).
LOGIT_SCALE = 3.0
NEAR_IDENTICAL_SCALING = 1e-6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU in Triton's interpreter (checks it runs)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per case first")
    return parser.parse_args(argv)


def make_logits(rows: int, vocab: int, dtype, kind: str, device: str, seed: int = 0):
    """(teacher, theta) logits of one batch; near-identical theta is formed in float32."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    teacher = torch.randn(rows, vocab, device=device, generator=generator) * LOGIT_SCALE
    if kind == "independent":
        theta = torch.randn(rows, vocab, device=device, generator=generator) * LOGIT_SCALE
    else:
        theta = teacher * (1.0 + NEAR_IDENTICAL_SCALING)
    return teacher.to(dtype), theta.to(dtype)


def time_step(step, device: str, repeats: int, warmup: int) -> float:
    """Milliseconds per call of `step` after `warmup` calls: CUDA events on a GPU, the
    host's clock (after the last result) on the CPU."""
    import torch

    for _ in range(warmup):
        step()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        return 1e3 * (time.perf_counter() - start) / repeats
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def float64_share(teacher, theta, vocab: int, config) -> float:
    """Share of rows the float32 tier of the fused solver left to the float64 one."""
    import sampler.mixing as mixing
    from sampler import fused_mixing

    _, precise = fused_mixing.solve_alpha_in_tiers(
        teacher, theta, vocab, config.temperature, config.alpha_method, config.alpha_min,
        config.alpha_max, config.tolerance, mixing.ROUNDING_SLACK, mixing.SMALL_RATIO,
        mixing.identical_models_alpha(config.alpha_min, config.alpha_max))
    return float((precise != 0).double().mean())


def run_case(method: str, rows: int, vocab: int, dtype_name: str, kind: str, device: str,
             args: argparse.Namespace) -> dict:
    """Every path's ms per step for one case (fused and graphed where they apply)."""
    import numpy as np
    import torch

    import sampler.mixing as mixing

    teacher, theta = make_logits(rows, vocab, getattr(torch, dtype_name), kind, device)
    config = mixing.MixingConfig(alpha_method=method, alpha_min=0.0, alpha_max=1.0)
    keys = torch.as_tensor(mixing.draw_keys(0, np.arange(rows), np.zeros(rows, np.int64)),
                           device=device)
    solved = method in ("kl_symmetry", "ess_balance")
    steps = {"torch": lambda: mixing.mix_and_draw(teacher, theta, vocab, config, keys)}
    if method != "entropy":  # entropy has no fused path
        steps["fused"] = lambda: mixing.mix_and_draw(teacher, theta, vocab, config, keys)
        if device == "cuda":
            graphed = mixing.GraphedMixing(vocab, rows)
            steps["graphed"] = lambda: graphed(teacher, theta, None, config, keys)
    result = {"method": method, "rows": rows, "vocab": vocab, "dtype": dtype_name,
              "inputs": kind, "ms_per_step": {}}
    for path, step in steps.items():
        mixing.BACKEND = "torch" if path == "torch" else "fused"
        try:
            result["ms_per_step"][path] = time_step(step, device, args.repeats, args.warmup)
        finally:
            mixing.BACKEND = "auto"
    if solved:
        result["float64_row_share"] = float64_share(teacher, theta, vocab, config)
    logger.info("%s", result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.repeats, args.warmup = 1, 1
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mixing_step: no CUDA device; run with --smoke on a CPU")
    cases = [run_case(method, rows, vocab, dtype, kind, device, args)
             for method in args.methods.split(",")
             for rows, vocab in (SMOKE_SHAPES if args.smoke else SHAPES)
             for dtype in args.dtypes.split(",")
             for kind in INPUTS]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "repeats": args.repeats, "warmup": args.warmup, "cases": cases}
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "mixing_step.json"
        out.write_text(json.dumps(report, indent=1))
        logger.info("wrote %s", out)
    return report


if __name__ == "__main__":
    main()
