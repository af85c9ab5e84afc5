#!/usr/bin/env bash
# Runs one stage on every host of a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_vm.sh TPU_NAME ZONE trainers.pretrain --config=configs/pretrain.py:1b \
#       --workdir=gs://BUCKET/runs/1b --config.mesh.fsdp=-1
#
# Copies this checkout to every worker, installs it there (`make install`, with JAX's TPU wheels),
# and starts the stage on all workers at once with --multihost, so jax.distributed.initialize()
# joins them into one job. The workdir must be shared storage (a GCS bucket) that all hosts see.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE MODULE [FLAGS...]" >&2
  exit 2
fi
tpu=$1 zone=$2 module=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/lmforge.tgz .
gcloud compute tpus tpu-vm scp /tmp/lmforge.tgz "$tpu":~/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; mkdir -p ~/lmforge && tar -C ~/lmforge -xzf ~/lmforge.tgz && cd ~/lmforge
  make install PYTHON=python3 && .venv/bin/pip install -q 'jax[tpu]'
  .venv/bin/python -m $module --multihost $*"
