"""The profiler's build / wrap / step code on CPU with tiny models (CI has no GPU), and the
estimator's trainable-parameter counts held against what peft really creates."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.arch import arch_from_hf_config, build_spec  # noqa: E402
from vramplan.estimator import estimate_setup  # noqa: E402
from vramplan.profiler.build import apply_method, build_model, make_optimizer  # noqa: E402
from vramplan.setup import make_setup, profiler_setup  # noqa: E402

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False,
              "max_position_embeddings": 128}
TINY_QWEN = {**TINY_LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 128}

CASES = [
    (TINY_LLAMA, {"method": "full"}),
    (TINY_LLAMA, {"method": "full", "optimizer": "sgd-momentum", "grad_checkpointing": True}),
    (TINY_LLAMA, {"method": "lora", "lora_rank": 8}),
    (TINY_LLAMA, {"method": "lora", "lora_rank": 4, "lora_targets": "q_proj,v_proj", "lora_dropout": 0.0}),
    (TINY_QWEN, {"method": "lora", "lora_rank": 8, "lora_targets": "attention", "attn": "eager"}),
    (TINY_LLAMA, {"method": "prefix", "prefix_tokens": 5}),
    (TINY_LLAMA, {"method": "prefix", "prefix_tokens": 5, "prefix_projection": True}),
    (TINY_LLAMA, {"method": "prompt", "prefix_tokens": 7}),
    (TINY_LLAMA, {"method": "ia3"}),
    (TINY_GPT2, {"method": "bitfit"}),
    (TINY_GPT2, {"method": "lora", "lora_rank": 4}),
    (TINY_QWEN, {"method": "full", "precision": "fp32", "optimizer": "adafactor"}),
]


def _setup(cfg, opts):
    spec = build_spec(arch_from_hf_config(cfg, "tiny"))
    setup = make_setup(spec, batch_size=2, seq_len=16, **opts)
    return spec, setup, profiler_setup(spec, setup)


@pytest.mark.parametrize(("cfg", "opts"), CASES, ids=lambda x: str(x.get("method", x.get("model_type"))) if isinstance(x, dict) else "")
def test_profiler_builds_wraps_and_steps_and_peft_agrees_with_the_estimator(cfg, opts):
    spec, setup, ps = _setup(cfg, opts)
    torch.manual_seed(0)
    model = apply_method(build_model(ps, torch.device("cpu")), ps)
    model.train()
    opt = make_optimizer(model, ps)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == estimate_setup(spec, setup).params_trainable
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert torch.isfinite(out.loss)


def test_lora_adapters_are_fp32_on_a_bf16_base():
    ps = _setup(TINY_LLAMA, {"method": "lora"})[2]
    model = apply_method(build_model(ps, torch.device("cpu")), ps)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_worker_without_cuda_records_an_error_not_a_crash():
    import json
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU path")
    _, _, ps = _setup(TINY_LLAMA, {"method": "full"})
    proc = subprocess.run([sys.executable, "-m", "vramplan.profiler.worker", json.dumps(ps)], capture_output=True,
                          text=True, timeout=300)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["status"] == "error"


def test_trace_replay_groups_alive_allocations_by_site():
    from vramplan.profiler.worker import _MARKS, summarise_trace

    ev = [{"action": "alloc", "addr": 1, "size": 4 << 20, "frames": [{"filename": "x/transformers/m.py", "line": 3, "name": "f"}]},
          {"action": "alloc", "addr": 9, "size": _MARKS["start"] * 512},
          {"action": "alloc", "addr": 2, "size": 8 << 20, "frames": [{"filename": "x/peft/l.py", "line": 7, "name": "g"}]},
          {"action": "alloc", "addr": 10, "size": _MARKS["after_fwd"] * 512},
          {"action": "free_requested", "addr": 2, "size": 8 << 20}]
    s = summarise_trace({"device_traces": [ev]})
    assert s["after_fwd"]["bytes"] == 12 << 20
    assert s["peak"]["bytes"] == 12 << 20
    assert s["after_fwd"]["groups"][0][:3] == ["l.py:7:g", 8 << 20, 1]


@pytest.mark.gpu
def test_profile_reproduces_a_reference_case_on_cuda():
    from vramplan.catalog import resolve_model
    from vramplan.profiler.worker import run_case

    spec = resolve_model("qwen2.5-0.5b")
    rec = run_case(profiler_setup(spec, make_setup(spec, batch_size=4, seq_len=512)), steps=3)
    assert abs(rec["peak_allocated"] / 10_303_881_728 - 1) < 0.02


def test_a_multi_gpu_case_with_an_unknown_engine_option_is_refused_before_any_launch(tmp_path):
    from vramplan.errors import VramplanError
    from vramplan.profiler.sweep import case_setups

    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - {name: x, model: llama-3.2-1b, gpus: 2, fsdp: bogus, method: full}\n")
    with pytest.raises(VramplanError, match="unknown fsdp mode 'bogus'"):
        case_setups(cases)
    cases.write_text("cases:\n  - {name: x, model: llama-3.2-1b, gpus: 0, method: full}\n")
    with pytest.raises(VramplanError, match="gpus must be a positive integer"):
        case_setups(cases)
    cases.write_text("cases:\n  - {name: x, model: llama-3.2-1b, gpus: 2, zero: 3, offload: params, method: full}\n")
    assert case_setups(cases)[0]["zero"] == 3


def test_end_of_run_segments_are_summed_per_stream_and_device():
    from vramplan.profiler.worker import segments_by_stream

    MiB = 2**20
    segs = [{"device": 0, "stream": 0, "total_size": 20 * MiB, "allocated_size": 8 * MiB},
            {"device": 0, "stream": 0, "total_size": 2 * MiB, "allocated_size": 0},
            {"device": 0, "stream": 77, "total_size": 112 * MiB, "allocated_size": 112 * MiB},
            {"device": 1, "stream": 0, "total_size": 999 * MiB, "allocated_size": 0}]
    out = segments_by_stream(segs, 0)
    assert out["0"] == {"segments": 2, "bytes": 22 * MiB, "allocated": 8 * MiB, "sizes_mib": {"20": 1, "2": 1}}
    assert out["77"]["bytes"] == out["77"]["allocated"] == 112 * MiB
    assert "1" not in out and sum(v["segments"] for v in out.values()) == 3


def test_sweep_reads_records_that_two_ranks_printed_on_one_line():
    from vramplan.profiler.sweep import records_in

    out = 'noise\n{"setup": {"name": "a"}, "rank": 1}{"setup": {"name": "a"}, "rank": 0}\n{"setup": {"na\n{"setup": {}}\n'
    assert [r.get("rank") for r in records_in(out)] == [1, 0, None]


def test_sweep_timeout_kills_the_launchs_child_processes(tmp_path, monkeypatch):
    import time

    from vramplan.profiler import sweep

    pidfile = tmp_path / "child.pid"
    # a launcher whose child (as torchrun's ranks) would outlive a kill of the launcher alone
    cmd = f"sleep 60 >/dev/null 2>&1 & echo $! > {pidfile}; echo 'model built at 0 s' >&2; wait"
    monkeypatch.setattr(sweep, "launch_command", lambda setup: ["bash", "-c", cmd])
    recs = sweep.run_one({"name": "x"}, timeout_s=1)
    assert recs[0]["status"] == "timeout"
    assert "model built" in recs[0]["stderr_tail"], "the timeout record keeps where the launch got to"
    stat = Path(f"/proc/{int(pidfile.read_text())}/stat")

    def running() -> bool:  # a zombie waiting for its reaper has stopped too
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    for _ in range(50):
        if not running():
            break
        time.sleep(0.1)
    assert not running(), "the launch's child still runs after the case timed out"


def test_sweep_timeout_returns_while_an_escaped_child_still_holds_its_output(tmp_path, monkeypatch):
    import os
    import signal
    import time

    from vramplan.profiler import sweep

    pidfile = tmp_path / "child.pid"
    # a child in a session of its own survives the kill of the launch's group (as a rank stuck in
    # the driver outlives SIGKILL) and keeps the launch's stdout and stderr open
    cmd = f"setsid sleep 30 & echo $! > {pidfile}; echo 'stage: model built' >&2; wait"
    monkeypatch.setattr(sweep, "launch_command", lambda setup: ["bash", "-c", cmd])
    t0 = time.monotonic()
    try:
        recs = sweep.run_one({"name": "x"}, timeout_s=1)
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert time.monotonic() - t0 < 10, "the sweep waited for the escaped child's output"
    assert recs[0]["status"] == "timeout"
    assert "stage: model built" in recs[0]["stderr_tail"]
