"""Write data/accuracy_baseline.json: each record's current estimate error, one entry per record.
Run after a model change that improves accuracy or after committing new measurements; the tests
then hold every record to a band around its entry. Refuses to record a worse error (larger, or of
the other sign) unless --allow-worse is given, and lists what got worse.

    python scripts/update_baseline.py [--allow-worse]
"""

from __future__ import annotations

import json
import sys

from vramplan.datafiles import data_dir
from vramplan.records import compare, load_records, load_reference, reference_path, worse_than


def main(argv: list[str]) -> int:
    allow_worse = "--allow-worse" in argv
    ref = reference_path()
    path = data_dir() / "accuracy_baseline.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    comps = compare(load_records() + (load_reference(ref) if ref.exists() else []))
    names = [c.name for c in comps]
    if len(names) != len(set(names)):
        print(f"refused: records share a name: {sorted({n for n in names if names.count(n) > 1})}", file=sys.stderr)
        return 2
    new = {c.name: round(c.error, 5) for c in comps}
    worse = {k: (old[k], v) for k, v in new.items() if k in old and worse_than(v, old[k])}
    if worse and not allow_worse:
        for k, (a, b) in sorted(worse.items()):
            print(f"worse: {k}: {a:+.5f} -> {b:+.5f}", file=sys.stderr)
        print(f"refused: {len(worse)} record(s) got worse; fix the model or pass --allow-worse", file=sys.stderr)
        return 2
    path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    dropped = sorted(set(old) - set(new))
    print(f"{len(new)} records" + (f"; dropped {len(dropped)} without a record: {dropped}" if dropped else "")
          + (f"; {len(worse)} allowed worse" if worse else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
