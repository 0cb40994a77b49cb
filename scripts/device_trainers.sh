#!/usr/bin/env bash
# Device-side: install the carried wheels (.whl/: trl, datasets, liger-kernel, bitsandbytes and what
# they need; .whl/opt/: packages installed only where the image lacks them), then measure a cases
# file through the real trainers. Usage: scripts/device_trainers.sh CASES OUT.jsonl [device_sweep.py args]
set -uo pipefail
source scripts/device_wheels.sh
install_trainer_wheels || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
cases=$1; out=$2; shift 2
python3 scripts/device_sweep.py "$cases" "$out" "$@"
