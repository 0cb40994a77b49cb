"""Print the README's multi-GPU table: every multi-GPU record (rank 0; the other ranks agree to
0.1%), its engine, measured vs estimated peak allocated per GPU, and host RSS vs the estimate's
host memory per rank."""

from __future__ import annotations

from vramplan.records import is_distributed, load_records, record_name, record_totals

GiB = 2**30


def _engine(rec: dict) -> str:
    s = rec["setup"]
    if s.get("fsdp"):
        eng = f"FSDP2 {s['fsdp']}"
    elif s.get("zero"):
        eng = f"ZeRO-{s['zero']}"
    else:
        eng = "DDP"
    off = s.get("offload", "none")
    return eng + (f" + offload {off}" if off and off != "none" else "")


def main() -> None:
    print("| run (per GPU, rank 0) | engine | measured | estimated | error | host RSS measured |")
    print("|---|---|---:|---:|---:|---:|")
    errs = []
    for rec in load_records():
        if rec.get("status") != "ok" or int(rec.get("world_size", 1)) < 2 or not is_distributed(rec):
            continue
        est = record_totals(rec).peak_allocated
        err = est / rec["peak_allocated"] - 1
        errs.append(abs(err))
        if rec.get("rank", 0) == 0:
            print(f"| {record_name(rec).split('@')[0]} | {_engine(rec)} | {rec['peak_allocated'] / GiB:.2f} GiB | "
                  f"{est / GiB:.2f} GiB | {100 * err:+.1f}% | {rec.get('host_rss_peak', 0) / GiB:.1f} GiB |")
    errs.sort()
    print(f"\n{len(errs)} per-rank records: median |error| {100 * errs[len(errs) // 2]:.2f}%, worst {100 * errs[-1]:.2f}%")


if __name__ == "__main__":
    main()
