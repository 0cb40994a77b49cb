"""The analytic model held against every committed GPU measurement (data/measurements) and the
shared reference. A change that makes estimates worse fails here."""

from __future__ import annotations

import json

import pytest

from vramplan.datafiles import data_dir
from vramplan.records import baseline_band, compare, load_records, load_reference, summarise

from .conftest import SHARED_REFERENCE

# Records the model is known to miss, each with the reason. The test pins their current error so
# that fixing one forces its removal here. Nothing else is exempt.
# Measured on 2 x H200 (d4 held out, d5 diagnostic), at first measurement; each to leave this table
# as its mechanism is modelled (band: the error may only move towards zero).
KNOWN_GAPS: dict[str, tuple[float, float]] = {
    # TRL LoRA under ZeRO-2 at 4096 tokens: over
    **{f"d4-z2-smol3-trl-lora-b4s4096@r{r}": (-0.01, 0.12) for r in (0, 1)},
    # ZeRO-1 full fine-tune of Gemma 3 1B (262k vocabulary, tied; 4 x H200, held out): under on
    # ranks 0-1, whose partitions hold the 302M-element embedding. Traced at their peak, the end of
    # backward: the extra-large gradients (> reduce_bucket_size) kept whole, grads_in_partition
    # sized by every parameter touching the partition (stage_1_and_2.py copy_grads_in_partition sums
    # whole numels, so the straddling embedding counts whole: 576 and 955 MiB), and three
    # embedding-sized 576 MiB blocks -- the gradient, allreduce_bucket's flatten copy, and one not
    # yet explained. Ranks 2-3 peak at the loss and are within 1%. t13-: its traced re-run.
    **{f"{run}-z1-g3-1b-hf-full-b1s512@r{r}": (-0.08, -0.06) for run in ("d11", "t13") for r in (0, 1)},
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
    lo, hi = baseline_band(base)  # and within its own band: no 25x drift, no change of sign
    assert lo <= c.error <= hi, f"{c.name}: {c.error:+.5f} outside [{lo:+.5f}, {hi:+.5f}] around baseline {base:+.5f}"


def test_baseline_entries_and_records_match_one_to_one():
    names = [c.name for c in COMPS]
    assert len(names) == len(set(names)), "two records share a name"
    expected = set(BASELINE) if SHARED_REFERENCE.exists() else {k for k in BASELINE if not k.startswith("shared-ref-")}
    assert set(names) == expected, f"records without baseline: {sorted(set(names) - expected)}; " \
                                   f"baseline without record: {sorted(expected - set(names))}"


@pytest.mark.parametrize(("base", "error", "ok"), [
    (0.0004, 0.01, False),  # the old floor let a 0.04% record drift to 1% (25x)
    (0.02, -0.02, False),  # a change of sign
    (-0.00405, -0.0081, True), (-0.00405, -0.0082, False),  # at most twice the baseline
    (0.0, 0.0005, True), (0.0, 0.0006, False),
    (-0.03, -0.0349, True), (-0.03, -0.0351, False),  # at most 0.5 pt more
])
def test_baseline_band_keeps_sign_and_size(base, error, ok):
    lo, hi = baseline_band(base)
    assert (lo <= error <= hi) is ok


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


def test_update_baseline_refuses_a_worse_error(tmp_path, monkeypatch):
    import importlib.util

    from vramplan import datafiles

    spec = importlib.util.spec_from_file_location("update_baseline", data_dir().parent / "scripts" / "update_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "data"
    data.mkdir()
    worse = {k: (v / 2 if abs(v) > 0.002 else v) for k, v in BASELINE.items()}  # pretend the baseline was better
    (data / "accuracy_baseline.json").write_text(json.dumps(worse))
    monkeypatch.setattr(mod, "data_dir", lambda: data)
    assert mod.main([]) == 2
    assert json.loads((data / "accuracy_baseline.json").read_text()) == worse  # untouched
    assert mod.main(["--allow-worse"]) == 0
    assert json.loads((data / "accuracy_baseline.json").read_text()).keys() == {c.name for c in COMPS}
    del datafiles
