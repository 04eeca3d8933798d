#!/usr/bin/env bash
# Fill one distill_experiment.py folder with PROCS_PER_GPU shard processes on every visible GPU, then summarise.
# Small students (ViM-T on 28 px images) are bound by kernel launches when eager; with CUDA-graph steps (the default)
# one process keeps an H200 busy (21.5 steps/s; two per GPU ran 10.6 each), so 1-2 per GPU. Each shard runs every
# K-th job (--shard I/K); logs go to OUT/logs/.
#   benchmarks/distill_experiment_parallel.sh PROCS_PER_GPU OUT [distill_experiment.py options]
set -euo pipefail
per_gpu=$1 out=$2
shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then echo "distill_experiment_parallel.sh: no CUDA GPU visible" >&2; exit 1; fi
shards=$((per_gpu * gpus))
mkdir -p "$out/logs"
python3 "$here/distill_experiment.py" --out "$out" --prepare-only "$@"  # converted students exist before any shard
pids=()
for ((i = 0; i < shards; i++)); do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 "$here/distill_experiment.py" --out "$out" --shard "$i/$shards" "$@" \
    >"$out/logs/shard-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < shards; i++)); do
  wait "${pids[$i]}" || { echo "shard $i failed (exit $?): $out/logs/shard-$i.log" >&2; tail -5 "$out/logs/shard-$i.log" >&2; status=1; }
done
python3 "$here/distill_experiment.py" --out "$out" --summary-only
exit $status
