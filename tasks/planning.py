"""What a run generates for its date, in shards keyed by everything that changes the samples.

1. the first samples (`samples_per_prompt`) of every prompt version that no other date owns:
   prompts new or changed since this dataset's runs of this generation (the ledger claims
   them, so two dates never both generate one);
2. with `samples_per_run`, that many fresh samples of every current prompt whose first
   samples this date or an earlier one owns (prompts that came later are not sampled for
   an earlier date), in a round named by the run date: their seed derives from the dataset
   seed and the date.

A shard's key hashes the generation, the round, the sample count and its prompts' ids and
content, so a rerun of the date finds its finished shards by name. The plan is made from the
current source: a rerun publishes the same rows unless a prompt the date sampled was edited or
removed since (prompts added since are left to later dates).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Annotated

from prefect import task
from pydantic import StringConstraints

from tasks.config import DatasetConfig
from tasks.ledger import RunLedger
from tasks.staging import StagedPrompt

logger = logging.getLogger(__name__)

FIRST_ROUND = "first"
KEY_HEX_DIGITS = 20

ShardKey = Annotated[str, StringConstraints(pattern=rf"^[0-9a-f]{{{KEY_HEX_DIGITS}}}$")]
"""A shard's key as `split_into_shards` makes it. It names the shard's file, so a key read
from outside (a work order on the shared mount, a child flow run's parameters) is held to it."""


@dataclass(frozen=True)
class Shard:
    index: int
    key: ShardKey
    sample_round: str         # FIRST_ROUND, or the run date (ISO) of a samples_per_run round
    samples: int              # samples per prompt
    prompts: tuple[StagedPrompt, ...]


def split_into_shards(prompts: list[StagedPrompt], generation: str, sample_round: str,
                      samples: int, shard_size: int, first_index: int = 0) -> list[Shard]:
    """Prompts in id order, `shard_size` to a shard."""
    ordered = sorted(prompts, key=lambda p: p.prompt_id)
    shards = []
    for offset, start in enumerate(range(0, len(ordered), shard_size)):
        chunk = tuple(ordered[start:start + shard_size])
        digest = hashlib.sha256(f"{generation}:{sample_round}:{samples}".encode())
        for prompt in chunk:
            digest.update(f"|{prompt.prompt_id}:{prompt.content_hash}".encode())
        shards.append(Shard(first_index + offset, digest.hexdigest()[:KEY_HEX_DIGITS],
                            sample_round, samples, chunk))
    return shards


@task(name="plan-shards")
def plan_shards(ledger: RunLedger, prompts: list[StagedPrompt], config: DatasetConfig,
                shard_size: int) -> list[Shard]:
    """This date's shards: first samples of the prompt versions it claims, then its round."""
    generation = ledger.generation.key
    claims = ledger.claim_first_samples([p.version for p in prompts])
    claimed = [p for p in prompts if p.version in claims.mine]
    shards = split_into_shards(claimed, generation, FIRST_ROUND,
                               config.sampling.samples_per_prompt, shard_size)
    if config.sampling.samples_per_run:
        known = [p for p in prompts if p.version in claims.through_date]
        shards += split_into_shards(known, generation, ledger.run_date.isoformat(),
                                    config.sampling.samples_per_run, shard_size, len(shards))
    logger.info("%d of %d prompts new for this generation; %d shards of up to %d prompts",
                len(claimed), len(prompts), len(shards), shard_size)
    return shards
