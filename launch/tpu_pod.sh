#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), ship this checkout to every worker,
# install it, and start the same `jaxser train --distributed` on all workers at once;
# jax.distributed.initialize() finds the other workers by itself on TPU VMs.
#
# Usage (from the repository root):
#   TPU_NAME=ser-v4-32 ZONE=us-central2-b WORKDIR=gs://BUCKET/runs/x DATA=gs://BUCKET/data/y \
#     launch/tpu_pod.sh configs/X.py[:variant] [--config.a.b=value ...]
# Environment:
#   TPU_NAME, ZONE       the slice and its zone (required)
#   WORKDIR              gs://BUCKET/PATH (or a path every worker shares) for checkpoints/logs
#   DATA                 prepared data (gs:// or shared path); default: the config's data.dir
#   ACCELERATOR_TYPE     slice type when creating it (default v4-32)
#   RUNTIME_VERSION      TPU VM image when creating it (default tpu-ubuntu2204-base)
#   PROJECT, SPOT=1      gcloud project; create a spot (preemptible) slice
#   SETUP=0              skip copying and installing the code (already on the workers)
#   REMOTE_DIR           where the code lives on the workers (default jaxser)
# gs:// paths are mounted with gcsfuse at /tmp/gcs/BUCKET on every worker (jaxser's workdir is
# a POSIX folder: file lock, logs, Orbax checkpoints).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://BUCKET/PATH)}"
config=$1
shift
remote_dir=${REMOTE_DIR:-jaxser}
gflags=(--zone "$ZONE")
[[ -n ${PROJECT:-} ]] && gflags+=(--project "$PROJECT")

# Runs a shell command on every worker of the slice.
on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gflags[@]}" --worker=all --command "$1"
}

# 1. Create the slice unless it exists.
if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gflags[@]}" >/dev/null 2>&1; then
  create=(--accelerator-type "${ACCELERATOR_TYPE:-v4-32}"
          --version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}")
  [[ -n ${SPOT:-} ]] && create+=(--spot)
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${gflags[@]}" "${create[@]}"
fi

# 2. Copy the committed tree to every worker and install it with the TPU build of jax.
if [[ ${SETUP:-1} != 0 ]]; then
  tarball=$(mktemp --suffix=.tar.gz)
  git archive --format=tar.gz -o "$tarball" HEAD
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":/tmp/jaxser.tar.gz "${gflags[@]}" \
    --worker=all
  rm -f "$tarball"
  jax_version=$(sed -n 's/^jax==//p' requirements.txt)
  on_all "mkdir -p $remote_dir && tar xzf /tmp/jaxser.tar.gz -C $remote_dir && cd $remote_dir \
    && python3 -m pip install -q -r requirements.txt 'jax[tpu]==$jax_version' \
    && python3 -m pip install -q --no-deps -e ."
fi

# 3. gs://BUCKET/PATH -> /tmp/gcs/BUCKET/PATH, the bucket mounted on every worker.
mounted() {
  local path=$1 bucket
  if [[ $path != gs://* ]]; then echo "$path"; return; fi
  bucket=${path#gs://}
  bucket=${bucket%%/*}
  on_all "command -v gcsfuse >/dev/null || { \
      echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list \
      && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
      && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } >/dev/null \
    && mkdir -p /tmp/gcs/$bucket && { mountpoint -q /tmp/gcs/$bucket \
      || gcsfuse --implicit-dirs --rename-dir-limit=100000 $bucket /tmp/gcs/$bucket; }" >&2
  echo "/tmp/gcs/${path#gs://}"
}
args=(--config "$config" --config.workdir="$(mounted "$WORKDIR")")
[[ -n ${DATA:-} ]] && args+=(--config.data.dir="$(mounted "$DATA")")
args+=("$@")

# 4. The same command on every worker; output of all workers streams back here.
on_all "cd $remote_dir && python3 -m jaxser.cli train --distributed $(printf '%q ' "${args[@]}")"
