"""Print the README's accuracy table: estimate vs measured peak allocated, per method, over every
committed record (and the shared reference when it is beside the checkout)."""

from __future__ import annotations

from collections import defaultdict

from vramplan.records import compare, load_records, load_reference, reference_path, summarise

REF = reference_path()


def main() -> None:
    recs = load_records()
    comps = compare(recs)
    by: dict[str, list] = defaultdict(list)
    for c in comps:
        by[c.method].append(c)
    print("| method | records | median abs error | worst abs error | worst under-estimate |")
    print("|---|---:|---:|---:|---:|")
    for m in ("full", "lora", "qlora", "galore", "prefix", "prompt", "ia3", "bitfit", "full (deepspeed)", "full (fsdp)"):
        if by.get(m):
            s = summarise(by[m])
            print(f"| {m} | {s.n} | {100 * s.median_abs:.2f}% | {100 * s.worst_abs:.2f}% | {100 * s.worst_under:.2f}% |")
    s = summarise(comps)
    print(f"| **all** | {s.n} | {100 * s.median_abs:.2f}% | {100 * s.worst_abs:.2f}% | {100 * s.worst_under:.2f}% |")
    print(f"\np90 abs error over all records: {100 * s.p90_abs:.2f}%")
    trainer_table(recs)
    if REF.exists():
        r = summarise(compare(load_reference(REF)))
        print(f"shared reference (8 H100 runs): median {100 * r.median_abs:.2f}%, worst {100 * r.worst_abs:.2f}%")


def trainer_table(recs: list) -> None:
    """Real-trainer records by trainer, split into the records the trainer terms were read off
    (data/cases/trainers1.yaml, names tr-*) and those measured after (trainers2.yaml, h2-*)."""
    rows: dict[tuple[str, str], list] = defaultdict(list)
    for r, c in zip([r for r in recs if r.get("status") == "ok"], compare(recs), strict=True):
        tr = r["setup"].get("trainer", "plain")
        if tr == "plain":
            continue
        split = "held out" if c.name.startswith("h2-") else ("in-sample" if c.name.startswith("tr-") else "callback")
        rows[(tr, split)].append(c)
        rows[("all trainers", split)].append(c)
    print("\n| trainer | records | median abs error | p90 abs | worst abs error | worst under-estimate |")
    print("|---|---:|---:|---:|---:|---:|")
    for (tr, split), cs in sorted(rows.items()):
        s = summarise(cs)
        print(f"| {tr} ({split}) | {s.n} | {100 * s.median_abs:.2f}% | {100 * s.p90_abs:.2f}% | {100 * s.worst_abs:.2f}% | "
              f"{100 * s.worst_under:.2f}% |")


if __name__ == "__main__":
    main()
