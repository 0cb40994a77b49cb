"""Speed and footprint figures (README "Speed"): CLI wall time, import cost, estimates per second,
planner throughput. Prints the figures; asserts nothing (targets live here, not in timed tests)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def cli_wall(args: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vramplan.cli", *args], capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, vramplan; print(int('torch' in sys.modules), "
                          "int('transformers' in sys.modules))"], capture_output=True, text=True, check=True).stdout.split()
    print(f"import vramplan loads torch: {out[0] == '1'}, transformers: {out[1] == '1'}")
    t = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vramplan"], capture_output=True, text=True).stderr
    total = int(t.strip().splitlines()[-1].split("|")[1])
    print(f"import vramplan: {total / 1000:.0f} ms")
    print(f"CLI `vramplan estimate --model 70b --method qlora` wall (median of 7): "
          f"{cli_wall(['estimate', '--model', '70b', '--method', 'qlora']):.3f} s  (target < 0.3 s)")
    print(f"CLI `vramplan estimate ... --json` wall (median of 7): "
          f"{cli_wall(['estimate', '--model', '70b', '--method', 'qlora', '--json']):.3f} s")

    from vramplan.catalog import resolve_model
    from vramplan.estimator import estimate_setup
    from vramplan.setup import make_setup

    for name, method in (("llama-3.1-8b", "lora"), ("llama-3.1-405b", "qlora"), ("mixtral-8x7b", "full")):
        spec = resolve_model(name)
        setup = make_setup(spec, method=method)
        estimate_setup(spec, setup)
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            estimate_setup(spec, setup)
        print(f"estimate_setup {name} {method}: {n / (time.perf_counter() - t0):,.0f} estimates/s  (target >= 20,000)")

    from vramplan.distributed import estimate_distributed, make_parallel

    spec = resolve_model("llama-3.1-70b")
    setup = make_setup(spec, trainer="trl", method="lora")
    for kw in ({"zero": 3}, {"fsdp": "full_shard"}):
        par = make_parallel(gpus=8, **kw)
        estimate_distributed(spec, setup, par)
        n = 5000
        t0 = time.perf_counter()
        for _ in range(n):
            estimate_distributed(spec, setup, par)
        label = ", ".join(f"{k}={v}" for k, v in kw.items())
        print(f"estimate_distributed llama-3.1-70b TRL lora, 8 GPUs, {label}: "
              f"{n / (time.perf_counter() - t0):,.0f} estimates/s  (target >= 5,000)")

    import vramplan

    t0 = time.perf_counter()
    p = vramplan.plan("llama-3.1-8b", "RTX-4090", maximize="seq-len", batch_size=1)
    dt = time.perf_counter() - t0
    print(f"plan llama-3.1-8b on RTX-4090 (maximize seq-len): {p.searched:,} setups in {dt:.3f} s "
          f"({p.searched / dt:,.0f} setups/s)")


if __name__ == "__main__":
    main()
