"""Device-side: run sharded/offloaded cases with the real engines, one process each (world size 1
unless launched under torchrun). python scripts/device_dist.py OUT.jsonl"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vramplan.catalog import resolve_model
from vramplan.setup import make_setup, profiler_setup

CASES = [
    ("l3b-zero2-offopt-full-ckpt-b4s2048", "llama-3.2-3b", {"zero": 2, "offload": "optimizer"}),
    ("l3b-zero3-offparams-full-ckpt-b4s2048", "llama-3.2-3b", {"zero": 3, "offload": "params"}),
    ("l3b-fsdp-offparams-full-ckpt-b4s2048", "llama-3.2-3b", {"fsdp": "full_shard", "offload": "params"}),
    ("l3b-zero2-full-ckpt-b4s2048", "llama-3.2-3b", {"zero": 2, "offload": "none"}),
    ("l3b-fsdp-full-ckpt-b4s2048", "llama-3.2-3b", {"fsdp": "full_shard", "offload": "none"}),
]


def main() -> None:
    out = sys.argv[1]
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for name, model, par in CASES:
        if only and only not in name:
            continue
        spec = resolve_model(model)
        s = profiler_setup(spec, make_setup(spec, method="full", batch_size=4, seq_len=2048, grad_checkpointing=True,
                                            optimizer="adamw-fused"), name=name, steps=3, **par)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = subprocess.run([sys.executable, "-m", "vramplan.profiler.dist_worker", json.dumps(s)], capture_output=True,
                           text=True, timeout=400, env=env)
        line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
        rec = json.loads(line) if line else {"setup": s, "status": "error", "error": p.stderr[-2000:]}
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(name, rec.get("status"), round((rec.get("peak_allocated") or 0) / 2**30, 3), "GiB, rss",
              round((rec.get("rss_peak") or 0) / 2**30, 2), rec.get("error", "")[:300], flush=True)


if __name__ == "__main__":
    main()
