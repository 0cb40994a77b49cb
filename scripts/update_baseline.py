"""Write data/accuracy_baseline.json: each record's current estimate error. Run after a model
change that improves accuracy or after committing new measurements; the tests then forbid any
record from getting worse."""

from __future__ import annotations

import json

from vramplan.datafiles import data_dir
from vramplan.records import compare, load_records, load_reference, reference_path

REF = reference_path()

recs = load_records() + (load_reference(REF) if REF.exists() else [])
out = {c.name: round(c.error, 5) for c in compare(recs)}
(data_dir() / "accuracy_baseline.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
print(f"{len(out)} records")
