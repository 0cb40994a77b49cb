"""The analytic model held against every committed GPU measurement (data/measurements) and the
shared reference. A change that makes estimates worse fails here."""

from __future__ import annotations

import json

import pytest

from vramplan.datafiles import data_dir
from vramplan.records import compare, load_records, load_reference, summarise

from .conftest import SHARED_REFERENCE

# Records the model is known to miss, each with the reason. The test pins their current error so
# that fixing one forces its removal here. Nothing else is exempt.
KNOWN_GAPS = {
    # bitsandbytes LLM.int8 under gradient checkpointing keeps data-dependent outlier/quantisation
    # buffers in MatMul8bitLt ctx.tensors beyond the inputs the model counts (see the README).
    "l8b-lora-int8-ckpt-b2s1024": (-0.16, -0.10),
}


def _records():
    recs = load_records()
    if SHARED_REFERENCE.exists():
        recs += load_reference(SHARED_REFERENCE)
    return recs


COMPS = compare(_records())
BASELINE = json.loads((data_dir() / "accuracy_baseline.json").read_text())


def test_there_are_at_least_60_committed_measurements():
    recs = load_records()
    assert len([r for r in recs if r.get("status") == "ok"]) >= 60
    for r in recs:
        assert r["gpu"] and r["versions"]["torch"] and r["date"] and r["setup"]["hf_config"], r["setup"]["name"]


def test_accuracy_targets_over_all_records():
    comps = [c for c in COMPS if c.name not in KNOWN_GAPS]
    s = summarise(comps)
    assert s.median_abs <= 0.03, s
    assert s.p90_abs <= 0.06, s
    assert s.worst_abs <= 0.10, s
    assert s.worst_under >= -0.05, s


@pytest.mark.parametrize("c", COMPS, ids=lambda c: c.name)
def test_no_record_gets_worse_than_its_baseline(c):
    """Each record's |error| may not grow by more than 0.5 points over the committed baseline."""
    if c.name in KNOWN_GAPS:
        lo, hi = KNOWN_GAPS[c.name]
        assert lo <= c.error <= hi, f"{c.name} moved to {c.error:+.3f}: update or remove its KNOWN_GAPS entry"
        return
    base = BASELINE.get(c.name)
    assert base is not None, f"{c.name} has no baseline: run scripts/update_baseline.py"
    assert abs(c.error) <= max(abs(base) + 0.005, 0.01), f"{c.name}: {c.error:+.4f} vs baseline {base:+.4f}"


def test_reference_runs_within_5_percent_each():
    if not SHARED_REFERENCE.exists():
        pytest.skip("shared/reference not beside the checkout")
    for c in compare(load_reference(SHARED_REFERENCE)):
        assert abs(c.error) <= 0.05, (c.name, c.error)


def test_profiler_reproduces_the_reference_within_2_percent():
    if not SHARED_REFERENCE.exists():
        pytest.skip("shared/reference not beside the checkout")
    ref = {"ref-" + json.loads(line)["case"]["name"]: json.loads(line) for line in SHARED_REFERENCE.read_text().splitlines()}
    ours = [r for r in load_records() if r["setup"]["name"] in ref]
    assert len(ours) >= 4
    for r in ours:
        assert abs(r["peak_allocated"] / ref[r["setup"]["name"]]["peak_allocated"] - 1) <= 0.02


def test_reserved_estimate_median_error():
    from statistics import median

    from vramplan.records import record_estimate

    errs = [abs(record_estimate(r).peak_reserved_bytes / r["peak_reserved"] - 1)
            for r in load_records() if r.get("status") == "ok" and not r.get("concurrent") and not r.get("engine")]
    assert median(errs) <= 0.10
