#!/usr/bin/env bash
# Creates what the deployments run on: a process work pool and a tag concurrency limit of one
# generation task per GPU (generate-shard tasks carry the tag `gpu`). Idempotent.
set -euo pipefail
gpus="${GPUS:-1}"
prefect work-pool create distill-pool --type process --overwrite
prefect concurrency-limit delete gpu >/dev/null 2>&1 || true
prefect concurrency-limit create gpu "$gpus"
