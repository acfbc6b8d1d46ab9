#!/usr/bin/env bash
# Train on one machine with every local device (all GPUs, all TPU chips of a single host, or
# the CPU). jaxser builds its mesh over the devices JAX sees; nothing else to set up.
#
# Usage (from the repository root):
#   launch/local.sh configs/X.py[:variant] [--config.a.b=value ...]
# Environment:
#   CPU_DEVICES=N   run on the CPU as N devices (tests, laptops: exercises data parallelism)
#   PYTHON=...      interpreter (default: .venv/bin/python of this checkout, else python3)
# Example:
#   CPU_DEVICES=2 launch/local.sh configs/em2ldl_hubert.py:smoke \
#       --config.workdir=runs/smoke --config.data.dir=runs/demo/data
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
config=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}  # jaxser importable without installing.

if [[ -n ${CPU_DEVICES:-} ]]; then
  # Forced host devices must be set before JAX starts.
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES"
fi

exec "$python" -m jaxser.cli train --config "$config" "$@"
