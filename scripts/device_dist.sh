#!/usr/bin/env bash
# Device-side, several GPUs: install the carried trainer wheels (.whl/), DeepSpeed and its needs from the carried wheels (.whl/ds/;
# pydantic's family and psutil only where the image lacks them), then measure a cases file of
# multi-GPU Trainer runs (one torchrun launch per case, one record per rank).
# Usage: scripts/device_dist.sh CASES OUT.jsonl [device_sweep.py args]
set -uo pipefail
# TRL cases need trl, datasets and what they need (.whl/*.whl, as scripts/device_trainers.sh installs them)
source scripts/device_wheels.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  install_trainer_wheels || exit 1
fi
# Without .whl/ds (not carried) DeepSpeed stays uninstalled: DDP and FSDP2 cases need none.
if ls .whl/ds/*.whl >/dev/null 2>&1; then
  ds=$(ls .whl/ds/*.whl | grep -v -E 'pydantic|annotated_types|typing_inspection')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $ds || exit 1
  python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/ds/pydantic*.whl .whl/ds/annotated_types*.whl .whl/ds/typing_inspection*.whl
else
  echo "no .whl/ds: DeepSpeed not installed (ZeRO cases will record an error)"
fi
python3 -c "import psutil" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/opt/psutil-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L; python3 -c "import accelerate, transformers, torch; print('acc', accelerate.__version__, 'tf', transformers.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -2
python3 -c "import deepspeed; print('ds', deepspeed.__version__)" 2>&1 | tail -1
cases=$1; out=$2; shift 2
python3 scripts/device_sweep.py "$cases" "$out" "$@"
