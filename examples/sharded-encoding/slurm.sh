#!/bin/bash
# Slurm array job: one `effir encode` shard per array task, then one merge.
#   sbatch --array=0-7 examples/sharded-encoding/slurm.sh
# A preempted task that is requeued (--requeue) resumes from the blocks it
# finished (OUT.partial/). MODEL may be a model directory or, with ONNX=--onnx,
# an ONNX export (add --providers cuda,cpu on GPU nodes).
#SBATCH --job-name=effir-encode
#SBATCH --cpus-per-task=8
#SBATCH --requeue
set -euo pipefail
MODEL=${MODEL:-runs/minilm-prune-50-refit-distill}
DATA=${DATA:-data/scifact}
OUT=${OUT:-runs/encode/scifact}
N=${SLURM_ARRAY_TASK_COUNT:?run as an array job}
effir encode --quiet ${ONNX:-} --model "$MODEL" --data "$DATA" \
  --shard "${SLURM_ARRAY_TASK_ID}/${N}" --out "$OUT/shard-${SLURM_ARRAY_TASK_ID}"
# Afterwards (or as a dependent job, sbatch --dependency=afterok:JOBID):
#   effir eval ${ONNX:-} --model "$MODEL" --data "$DATA" --embeddings "$OUT"/shard-* --out "$OUT/eval"
