"""Measurement records (JSONL under data/measurements) and their re-estimation. No torch."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramplan.arch import arch_from_hf_config, build_spec
from vramplan.datafiles import data_dir
from vramplan.estimator import Estimate, estimate_setup
from vramplan.profiler.reference import reference_options
from vramplan.setup import Setup, make_setup

if TYPE_CHECKING:
    from vramplan.distributed import DistributedEstimate, Parallel, Totals

SETUP_KEYS = tuple(Setup.__dataclass_fields__)


def reference_path() -> Path:
    """shared/reference/h100_reference.jsonl beside the checkout (CI and sessions have it there)."""
    return data_dir().resolve().parent.parent / "shared" / "reference" / "h100_reference.jsonl"


def measurement_files() -> list[Path]:
    return sorted((data_dir() / "measurements").glob("*.jsonl"))


def load_records(paths: list[Path] | None = None) -> list[dict[str, Any]]:
    out = []
    for p in paths if paths is not None else measurement_files():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def load_reference(path: Path) -> list[dict[str, Any]]:
    """shared/reference/h100_reference.jsonl in the record schema of data/measurements."""
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        opts = reference_options(r["case"], r["arch_config"])
        opts["lora_targets"] = opts.get("lora_targets", "all-linear")
        setup = {"name": "shared-ref-" + r["case"]["name"], "model": r["case"]["arch"], "hf_config": r["arch_config"], **opts}
        recs.append({**r, "setup": setup, "status": "ok", "concurrent": False, "source": str(path)})
    return recs


def _spec_setup(rec: dict[str, Any]) -> tuple[Any, Setup]:
    s = rec["setup"]
    spec = build_spec(arch_from_hf_config(s["hf_config"], s.get("model", "custom")))
    opts = record_options(s)
    return spec, make_setup(spec, **opts)


def record_options(s: dict[str, Any]) -> dict[str, Any]:
    """A record's stored setup as make_setup options. Records without `trainer` were measured
    with the plain reference loop: every stored field is kept and the rest take plain defaults."""
    opts = {k: s[k] for k in SETUP_KEYS if k in s}
    opts.setdefault("trainer", "plain")
    opts["lora_targets"] = s.get("lora_targets") or "all-linear"
    return opts


def is_distributed(rec: dict[str, Any]) -> bool:
    """Sharded, offloaded or spread over several GPUs (DDP too)."""
    return bool(rec["setup"].get("zero") or rec["setup"].get("fsdp")) or int(rec.get("world_size", 1)) > 1


def record_name(rec: dict[str, Any]) -> str:
    """A record's name, with its rank when one launch wrote a record per GPU."""
    name = rec["setup"]["name"]
    return f"{name}@r{rec.get('rank', 0)}" if int(rec.get("world_size", 1)) > 1 else name


def record_estimate(rec: dict[str, Any]) -> Estimate:
    """Re-estimate a single-GPU record from the setup it carries."""
    spec, setup = _spec_setup(rec)
    return estimate_setup(spec, setup)


def record_parallel(rec: dict[str, Any]) -> Parallel:
    """The engine and world size a sharded, offloaded or multi-GPU record ran."""
    from vramplan.distributed import make_parallel

    s = rec["setup"]
    return make_parallel(gpus=int(rec.get("world_size", 1)), zero=s.get("zero") or 0, fsdp=s.get("fsdp"),
                         offload=s.get("offload", "none"))


def record_distributed(rec: dict[str, Any]) -> DistributedEstimate:
    """Re-estimate a sharded, offloaded or multi-GPU record per GPU, with the engine it ran."""
    from vramplan.distributed import estimate_distributed

    spec, setup = _spec_setup(rec)
    return estimate_distributed(spec, setup, record_parallel(rec))


def record_totals(rec: dict[str, Any]) -> Totals:
    """A record's estimated totals per GPU, sharded records included."""
    from vramplan.distributed import per_gpu_totals

    spec, setup = _spec_setup(rec)
    return per_gpu_totals(spec, setup, record_parallel(rec) if is_distributed(rec) else None)


@dataclass(frozen=True)
class Comparison:
    name: str
    method: str
    measured: int
    estimated: int
    measured_phase: str
    estimated_phase: str

    @property
    def error(self) -> float:
        return self.estimated / self.measured - 1


def _measured_phase(rec: dict[str, Any]) -> str:
    st = max(rec["steps"], key=lambda x: x["peak"])
    if st["peak"] > st["peak_bwd"]:
        return "optimizer_step"
    if "peak_fwd" not in st:  # trainer records: Trainer has no hook between forward and backward
        return "backward"
    return "backward" if st["peak_bwd"] > st["peak_fwd"] else "forward"


def compare(records: list[dict[str, Any]]) -> list[Comparison]:
    out = []
    for r in records:
        if r.get("status") != "ok":
            continue
        est, phase, _, _ = record_totals(r)
        method = r["setup"]["method"] + (f" ({r['engine']})" if is_distributed(r) else "")
        out.append(Comparison(record_name(r), method, r["peak_allocated"], est, _measured_phase(r), phase))
    return out


@dataclass(frozen=True)
class Summary:
    n: int
    median_abs: float
    p90_abs: float
    worst_abs: float
    worst_under: float


def summarise(comps: list[Comparison]) -> Summary:
    errs = sorted(abs(c.error) for c in comps)
    p90 = errs[min(len(errs) - 1, round(0.9 * (len(errs) - 1)))]
    return Summary(len(comps), statistics.median(errs), p90, errs[-1], min(0.0, min(c.error for c in comps)))


CUMULATIVE_PHASES = ("forward", "backward", "optimizer_step")


def cumulative_peaks(phases: dict[str, int]) -> dict[str, int]:
    """Peak allocated up to the end of each phase (load counts in all): what max_memory_allocated
    reads after the forward, the backward and the step."""
    order = ("load", *CUMULATIVE_PHASES)
    return {p: max(phases.get(q, 0) for q in order[: order.index(p) + 1]) for p in CUMULATIVE_PHASES}


def measured_vs_estimated(rec: dict[str, Any], est: Estimate) -> list[tuple[str, int, int]]:
    """(phase, measured cumulative peak, estimated cumulative peak) of a record's highest step."""
    st = max(rec["steps"], key=lambda x: x["peak"])
    # trainer records hold no forward-only peak (no Trainer hook between forward and backward)
    measured = {"forward": st.get("peak_fwd", st["peak_bwd"]), "backward": st["peak_bwd"], "optimizer_step": st["peak"]}
    est_cum = cumulative_peaks(est.phases)
    return [(p, measured[p], est_cum[p]) for p in CUMULATIVE_PHASES]


# The committed accuracy baseline (data/accuracy_baseline.json): each record's error may move only
# within a band around its baseline. It may grow by its own size at most (never past twice the
# baseline), by 0.05 pt at least and 0.5 pt at most, and it may not change sign (it may cross zero
# by 0.05 pt). Near zero (|baseline| < 0.05 pt) the band is +-(|baseline| + 0.05 pt).
BAND_FLOOR = 0.0005
BAND_CAP = 0.005


def baseline_band(base: float) -> tuple[float, float]:
    """(lowest, highest) error allowed for a record whose committed error is `base`."""
    reach = abs(base) + min(BAND_CAP, max(BAND_FLOOR, abs(base)))
    if abs(base) < BAND_FLOOR:
        return -reach, reach
    return (-BAND_FLOOR, reach) if base > 0 else (-reach, BAND_FLOOR)


def worse_than(error: float, base: float) -> bool:
    """Whether `error` is worse than the baseline `base`: larger in size, or of the other sign."""
    flipped = abs(base) >= BAND_FLOOR and abs(error) > BAND_FLOOR and (error > 0) != (base > 0)
    return abs(error) > abs(base) + 1e-5 or flipped
