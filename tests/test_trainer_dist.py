"""Multi-GPU Trainer launches (vramplan.profiler.trainer_dist): where each engine's ranks build
the model, what their records say of it, and the FSDP2 re-measurement cases (data/cases/dist3.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vramplan.profiler.sweep import case_setups
from vramplan.profiler.trainer_dist import launch_fields, load_place, record_load_place

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "data" / "cases"
sys.path.insert(0, str(ROOT / "scripts"))
import update_reserved_baseline as baseline  # noqa: E402


@pytest.mark.parametrize(("setup", "place"), [
    ({"gpus": 2, "fsdp": "full_shard", "dtype": "bf16"}, "cpu"),
    ({"gpus": 2, "fsdp": "shard_grad_op", "dtype": "bf16"}, "cpu"),
    ({"gpus": 2, "fsdp": "full_shard", "offload": "params", "dtype": "bf16"}, "cpu"),
    ({"gpus": 2, "fsdp": "full_shard", "dtype": "nf4"}, "cuda"),
    ({"gpus": 2, "zero": 3, "dtype": "bf16"}, "zero-init"),
    ({"gpus": 2, "zero": 3, "offload": "params", "dtype": "bf16"}, "zero-init"),
    ({"gpus": 2, "zero": 2, "offload": "optimizer", "dtype": "bf16"}, "cuda"),
    ({"gpus": 2, "zero": 1, "dtype": "bf16"}, "cuda"),
    ({"gpus": 2, "dtype": "bf16"}, "cuda"),
    ({"dtype": "bf16"}, "cuda"),
])
def test_fsdp2_builds_on_the_host_zero3_under_zero_init_the_rest_on_the_gpu(setup, place):
    assert load_place(setup) == place


def test_records_say_where_the_model_was_built(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    f = launch_fields({"gpus": 2, "fsdp": "full_shard", "dtype": "bf16"})
    assert f == {"engine": "fsdp2", "load": "cpu", "world_size": 2, "rank": 1}


def test_records_without_load_were_built_on_the_gpu_but_under_zero3():
    assert record_load_place({"engine": "fsdp2", "setup": {"gpus": 2, "fsdp": "full_shard"}}) == "cuda"
    assert record_load_place({"engine": "deepspeed", "setup": {"gpus": 2, "zero": 3}}) == "zero-init"
    assert record_load_place({"engine": "deepspeed", "setup": {"gpus": 2, "zero": 2}}) == "cuda"
    assert record_load_place({"load": "cpu", "setup": {"gpus": 2, "fsdp": "full_shard"}}) == "cpu"


def test_build_device_follows_the_load_place():
    torch = pytest.importorskip("torch")
    from vramplan.profiler.trainer_worker import build_device

    gpu = object()  # stands for torch.device("cuda", rank) on a machine without CUDA
    assert build_device("cpu", gpu) == torch.device("cpu")
    assert build_device("zero-init", gpu) is None
    assert build_device("cuda", gpu) is gpu


def _fsdp_record(**extra):
    return {"engine": "fsdp2", "world_size": 2, "setup": {"gpus": 2, "fsdp": "full_shard"},
            "device_used_end": 30 * 2**30, "peak_reserved": 29 * 2**30, "managed_bytes": 0, **extra}


def test_only_fsdp2_records_built_on_the_host_have_comparable_device_totals():
    assert not baseline.device_comparable(_fsdp_record())
    assert baseline.device_comparable(_fsdp_record(load="cpu"))
    assert not baseline.device_comparable(_fsdp_record(load="cpu", concurrent=True))


def _key(setup):
    return {k: v for k, v in setup.items() if k not in ("name", "trace")}


def test_dist3_remeasures_six_dist2_fsdp2_cases_on_the_host():
    d3 = case_setups(CASES / "dist3.yaml")
    d2 = {s["name"]: s for s in case_setups(CASES / "dist2.yaml")}
    assert len(d3) == 6
    for s in d3:
        assert s["name"].startswith("d3-"), s["name"]
        old = d2["d2-" + s["name"].removeprefix("d3-")]
        assert _key(s) == _key(old), s["name"]
        assert load_place(s) == "cpu" and launch_fields(s)["engine"] == "fsdp2"
        assert record_load_place({"setup": old, "engine": "fsdp2"}) == "cuda"
    assert {s["fsdp"] for s in d3} == {"full_shard", "shard_grad_op"}
    assert any(s.get("offload") == "params" for s in d3)
    assert {s["method"] for s in d3} == {"full", "lora"}


def test_fsdp2_gradient_shards_stay_reserved_on_the_reduce_scatter_stream_until_they_are_alive_again():
    from vramplan.distributed import fsdp_reduce_scatter_pool_bytes, make_parallel

    full = make_parallel(gpus=2, fsdp="full_shard")
    assert fsdp_reduce_scatter_pool_bytes(full, 1_000_000, grads_alive=False) == 4 * 1_000_000 // 2
    assert fsdp_reduce_scatter_pool_bytes(full, 1_000_000, grads_alive=True) == 0
    assert fsdp_reduce_scatter_pool_bytes(make_parallel(gpus=2, fsdp="full_shard", offload="params"), 10**6,
                                          grads_alive=False) == 0  # the shards go to the host
    assert fsdp_reduce_scatter_pool_bytes(make_parallel(gpus=2), 10**6, grads_alive=False) == 0  # DDP


def test_ddp_rebuilt_buckets_strand_only_when_trainer_lets_ddp_rebuild_them():
    from vramplan.catalog import resolve_model
    from vramplan.distributed import DDP_BUCKET_CAP_BYTES, ddp_rebuilt_bucket_bytes, make_parallel
    from vramplan.setup import make_setup

    spec = resolve_model("qwen2.5-1.5b")
    ddp = make_parallel(gpus=2)
    ckpt = make_setup(spec, method="full", trainer="hf", grad_checkpointing=True)
    nockpt = make_setup(spec, method="full", trainer="hf", grad_checkpointing=False)
    buckets = 3 << 30
    kept = 1 << 20  # small kept inputs reuse the freed bucket blocks
    assert ddp_rebuilt_bucket_bytes(ckpt, ddp, buckets=buckets, layers=28, ckpt_input=kept, grad_tensors=[]) == buckets - 28 * kept
    # kept inputs larger than a bucket's block cannot reuse it
    assert ddp_rebuilt_bucket_bytes(ckpt, ddp, buckets=buckets, layers=28, ckpt_input=DDP_BUCKET_CAP_BYTES + 1,
                                    grad_tensors=[]) == buckets
    # without checkpointing Trainer asks DDP to find unused parameters, and DDP never rebuilds
    assert ddp_rebuilt_bucket_bytes(nockpt, ddp, buckets=buckets, layers=28, ckpt_input=kept, grad_tensors=[]) == 0
    assert ddp_rebuilt_bucket_bytes(ckpt, make_parallel(gpus=2, zero=2), buckets=buckets, layers=28, ckpt_input=kept, grad_tensors=[]) == 0
