"""Device-side sweep: measure a list of cases (a YAML file of estimate options) and write JSONL
records. Run on a CUDA machine: python scripts/device_sweep.py CASES OUT.jsonl [--trace]."""

from __future__ import annotations

import argparse
from pathlib import Path

from vramplan.arch import arch_from_hf_config, build_spec
from vramplan.profiler.sweep import case_setups, run_cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("out")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--only", default="")
    ap.add_argument("--start", type=int, default=0, help="skip the first N cases")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--big", choices=["only", "skip", "any"], default="any",
                    help="cases on models of more than 4B parameters: only those, none of them, or any")
    a = ap.parse_args()
    setups = []
    for s in case_setups(Path(a.cases), trace=a.trace)[a.start:]:
        if a.only and a.only not in s["name"]:
            continue
        big = s.get("serial", False) or build_spec(arch_from_hf_config(s["hf_config"], s["model"])).params_total > 4e9
        if (a.big == "only" and not big) or (a.big == "skip" and big):
            continue
        setups.append(s)
    run_cases(setups, Path(a.out), budget_s=a.budget, parallel=a.parallel)


if __name__ == "__main__":
    main()
