#!/usr/bin/env bash
# Sourced by the device-side scripts (device_trainers.sh, device_dist.sh): install_trainer_wheels
# installs the carried wheels (.whl/*.whl: trl, datasets, liger-kernel, bitsandbytes and what
# they need) into /tmp/site, and the .whl/opt/ packages only where the image lacks them.
install_trainer_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  for m in pandas fsspec jinja2 psutil markupsafe; do
    python3 -c "import $m" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/opt/${m}-*.whl
  done
}
