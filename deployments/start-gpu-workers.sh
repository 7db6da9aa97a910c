#!/usr/bin/env bash
# Starts one Prefect worker per GPU of this machine on the work pool distill-gpu, each pinned to
# its GPU with CUDA_VISIBLE_DEVICES and running one flow run at a time (--limit 1). Run it on
# every GPU machine, with PREFECT_API_URL pointing at the one Prefect API and DISTILL_REPO at
# the repository (shard files and the data directory on storage every machine mounts).
# --gpus-per-worker N (default 1) starts one worker per group of N GPUs instead
# (CUDA_VISIBLE_DEVICES=0,1, then 2,3, ...), for a teacher with engine.teacher
# tensor_parallel_size N; N must divide the GPU count.
# GPUS overrides the count (default: nvidia-smi's). A worker still running (its pid in
# $DISTILL_LOG_DIR/prefect-gpu-worker-<i>.pid, i counting workers; default ./logs) is skipped,
# so running this again restarts only dead workers; logs go to prefect-gpu-worker-<i>.log.
# Stop them with: kill $(cat logs/prefect-gpu-worker-*.pid). An API beyond loopback is refused unless
# PREFECT_API_AUTH_STRING is set (require_api_auth.py; docs/deployments.md, Security).
set -euo pipefail
per_worker=1
while (($#)); do
  case "$1" in
    --gpus-per-worker) per_worker="${2:-}"; shift 2 || shift ;;
    --gpus-per-worker=*) per_worker="${1#*=}"; shift ;;
    *) echo "unknown argument $1 (usage: $0 [--gpus-per-worker N])" >&2; exit 2 ;;
  esac
done
if ! [[ "$per_worker" =~ ^[1-9][0-9]*$ ]]; then
  echo "--gpus-per-worker: '$per_worker' is not a whole number of GPUs of at least 1" >&2
  exit 2
fi
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect API every worker reports to}"
: "${DISTILL_REPO:?set DISTILL_REPO to the repository the workers run the flows from}"
python3 "$(dirname "$0")/require_api_auth.py"
gpus="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
if ((gpus == 0 || gpus % per_worker != 0)); then
  echo "$gpus GPUs do not split into workers of --gpus-per-worker $per_worker" >&2
  exit 2
fi
workers=$((gpus / per_worker))
# Host threads per worker: the machine's cores shared out, so that the workers' engines do
# not contend for the host (see benchmarks/MULTI_GPU.md).
threads=$(($(nproc) / workers))
((threads > 0)) || threads=1
logs="${DISTILL_LOG_DIR:-logs}"
mkdir -p "$logs"
for ((worker = 0; worker < workers; worker++)); do
  first=$((worker * per_worker))
  devices=$(seq -s, "$first" $((first + per_worker - 1)))
  pidfile="$logs/prefect-gpu-worker-$worker.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "GPU $devices: worker $(cat "$pidfile") is running"
    continue
  fi
  CUDA_VISIBLE_DEVICES=$devices OMP_NUM_THREADS=$threads nohup prefect worker start \
    --pool distill-gpu --limit 1 --name "$(hostname)-gpu${devices//,/-}" \
    > "$logs/prefect-gpu-worker-$worker.log" 2>&1 &
  echo $! > "$pidfile"
  echo "GPU $devices: worker $! started"
done
