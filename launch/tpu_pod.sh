#!/bin/bash
# Cloud TPU VM pod slice: run the same command on every worker; jax detects the TPU cluster.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --gin_file=gin_configs/runs/finetune.gin
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REPO_DIR="${REPO_DIR:-~/doa_jax}"
ENTRY="${DOA_ENTRY:-doa_jax.train}"
ARGS=""
for a in "$@"; do ARGS+=" $(printf '%q' "$a")"; done
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd $REPO_DIR && python3 -m $ENTRY$ARGS"
