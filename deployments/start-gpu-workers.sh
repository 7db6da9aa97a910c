#!/usr/bin/env bash
# Starts one Prefect worker per GPU of this machine on the work pool distill-gpu, each pinned to
# its GPU with CUDA_VISIBLE_DEVICES and running one flow run at a time (--limit 1). Run it on
# every GPU machine, with PREFECT_API_URL pointing at the one Prefect API and DISTILL_REPO at
# the repository (shard files and the data directory on storage every machine mounts).
# GPUS overrides the count (default: nvidia-smi's). A GPU whose worker is still running (its
# pid in $DISTILL_LOG_DIR/prefect-gpu-worker-<i>.pid; default ./logs) is skipped, so running
# this again restarts only dead workers; logs go to prefect-gpu-worker-<i>.log beside it.
# Stop them with: kill $(cat logs/prefect-gpu-worker-*.pid). An API beyond loopback is refused unless
# PREFECT_API_AUTH_STRING is set (require_api_auth.py; docs/deployments.md, Security).
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect API every worker reports to}"
: "${DISTILL_REPO:?set DISTILL_REPO to the repository the workers run the flows from}"
python3 "$(dirname "$0")/require_api_auth.py"
gpus="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
# Host threads per worker: the machine's cores shared out, so that the workers' engines do
# not contend for the host (see benchmarks/MULTI_GPU.md).
threads=$(( $(nproc) / gpus ))
logs="${DISTILL_LOG_DIR:-logs}"
mkdir -p "$logs"
for ((gpu = 0; gpu < gpus; gpu++)); do
  pidfile="$logs/prefect-gpu-worker-$gpu.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "GPU $gpu: worker $(cat "$pidfile") is running"
    continue
  fi
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$threads nohup prefect worker start \
    --pool distill-gpu --limit 1 --name "$(hostname)-gpu$gpu" \
    > "$logs/prefect-gpu-worker-$gpu.log" 2>&1 &
  echo $! > "$pidfile"
  echo "GPU $gpu: worker $! started"
done
