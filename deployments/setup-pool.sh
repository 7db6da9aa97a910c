#!/usr/bin/env bash
# Creates the work pools the deployments run on, and the automation that crashes GPU shares
# whose machine stopped answering (idempotent):
#   distill-pool  the distill flows (staging, planning, validation, publishing; CPU work)
#   distill-gpu   the GPU workers' share of each run (flows/shard_worker.py): start one worker
#                 per GPU with deployments/start-gpu-workers.sh on every GPU machine.
# A worker started with --limit 1 runs one flow run at a time, so each GPU holds one engine
# pair at a time whatever runs are queued. An API beyond loopback is refused unless
# PREFECT_API_AUTH_STRING is set (require_api_auth.py; docs/deployments.md, Security).
set -euo pipefail
python3 "$(dirname "$0")/require_api_auth.py"
prefect work-pool create distill-pool --type process --overwrite
prefect work-pool create distill-gpu --type process --overwrite
# Earlier versions limited tasks tagged `gpu` to one at a time across all workers; that limit
# would now hold every GPU worker to one shard at a time.
prefect concurrency-limit delete gpu >/dev/null 2>&1 || true
python3 "$(dirname "$0")/crash_unresponsive_runs.py"
