"""Issue 16's new-user findings, one test each (each failed before its fix)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vramplan
from vramplan.catalog import model_catalog, resolve_gpu, resolve_model
from vramplan.cli import app
from vramplan.errors import VramplanError
from vramplan.options import OPTIONS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+: the packaging tests read pyproject.toml
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vramplan.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _llama_folder(parent: Path, name: str) -> Path:
    d = parent / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model_catalog()["llama-3.2-1b"].config))
    return d


# 1 -------------------------------------------------------------------------------------------
def test_a_config_folder_not_in_the_catalogue_estimates_with_its_hint(tmp_path):
    cfg = _llama_folder(tmp_path, "my-project") / "config.json"
    p = _cli("estimate", "--model", str(cfg), "--batch-size", "8", "--trainer", "plain")
    assert p.returncode == 0, p.stderr
    assert "hint: activations" in p.stdout and "my-project" in p.stdout


def test_a_local_folder_beats_a_catalogue_name(tmp_path, monkeypatch):
    _llama_folder(tmp_path, "gpt2")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("gpt2").arch.family != "gpt2"
    assert resolve_model("./gpt2").arch.model_type == "llama"


# 2 -------------------------------------------------------------------------------------------
def test_messages_are_not_read_as_rich_markup():
    p = _cli("estimate", "--model", "my[bold]model")
    assert p.returncode == 2 and "my[bold]model" in p.stderr
    from vramplan.cli import render

    with render.err.capture() as cap:
        render.error_line(VramplanError("pip install 'vramplan[profile]'"))
    assert "vramplan[profile]" in cap.get()


# 3 -------------------------------------------------------------------------------------------
def test_70b_qlora_answers_like_the_qlora_recipe():
    e = vramplan.estimate("70b", "qlora")
    assert e.setup.grad_checkpointing  # peft prepare_model_for_kbit_training default
    assert e.device_total_bytes < 60 * 2**30  # the seed's "70B QLoRA ≈ 48 GB" plus the CUDA context
    r = runner.invoke(app, ["estimate", "--model", "70b", "--method", "qlora", "--json"])
    assert json.loads(r.output)["setup"]["grad_checkpointing"] is True


# 4 -------------------------------------------------------------------------------------------
def test_lengths_beyond_max_position_embeddings_are_refused_naming_the_maximum():
    with pytest.raises(VramplanError, match=r"seq_len 300000 exceeds llama-3.1-8b's max_position_embeddings \(131072\)"):
        vramplan.estimate("8b", seq_len=300_000)
    assert vramplan.estimate("8b", "qlora", seq_len=300_000, long_context=True).setup.seq_len == 300_000


def test_absurd_sizes_are_refused():
    with pytest.raises(VramplanError, match="tokens per micro-batch; allowed: at most"):
        vramplan.estimate("8b", batch_size=10**9, seq_len=2048)


def test_plan_never_offers_a_length_the_model_cannot_take():
    p = vramplan.plan("gemma-2-2b", "H200", "lora", maximize="seq-len", limit=3)
    assert all(c.setup.seq_len <= resolve_model("gemma-2-2b").arch.max_positions for c in p.candidates)


# 5 -------------------------------------------------------------------------------------------
def _flags(command: str) -> set[str]:
    import typer.main

    group = typer.main.get_group(app)
    cmd = group.commands[command]
    return {o for p in cmd.params for o in p.opts + p.secondary_opts}


@pytest.mark.parametrize("command", ["estimate", "fit", "plan", "profile"])
def test_every_setup_command_takes_every_table_option(command):
    flags = _flags(command)
    for o in OPTIONS:
        assert o.cli_flag in flags, (command, o.name)


def test_minus_o_means_output_wherever_it_exists():
    import typer.main

    group = typer.main.get_group(app)
    cmds = [*group.commands.values(), *group.commands["plot"].commands.values()]
    for cmd in cmds:
        for p in getattr(cmd, "params", []):
            if "-o" in p.opts:
                assert p.name in ("out_",), (cmd.name, p.name)


def test_plot_commands_take_json(tmp_path):
    out = tmp_path / "b.png"
    r = runner.invoke(app, ["plot", "breakdown", "--model", "1b", "--methods", "lora", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["wrote"] == str(out) and out.exists()


def test_library_fit_takes_one_gpu_name_and_engine_options():
    assert [r.gpu.name for r in vramplan.fit("1b", "lora", gpus="h100").rows] == ["H100-SXM-80GB"]
    res = vramplan.fit("8b", "full", gpus="H100", gpu_count=8, zero=3, grad_checkpointing=True)
    assert res.rows[0].needed_bytes < vramplan.fit("8b", "full", gpus="H100", grad_checkpointing=True).rows[0].needed_bytes


def test_fit_and_plan_functions_do_not_shadow_modules():
    assert callable(vramplan.fit) and callable(vramplan.plan)
    assert importlib.util.find_spec("vramplan.fit") is None and importlib.util.find_spec("vramplan.plan") is None
    import vramplan.decide.fit as fit_module

    assert fit_module.fit is not vramplan.fit and callable(vramplan.fit)


# 6 -------------------------------------------------------------------------------------------
def test_cards_without_bf16_judge_bf16_setups_in_fp16():
    rows = {r.gpu.name: r for r in vramplan.fit("1b", "lora", gpus=["T4", "L4"]).rows}
    assert rows["T4"].verdict.endswith("in fp16") and "no bf16" in rows["T4"].notes[0]
    assert rows["L4"].verdict == "fits"


def test_plan_does_not_recommend_bf16_on_a_card_without_it():
    p = vramplan.plan("1b", "T4", limit=50)
    assert p.candidates and all(c.setup.dtype != "bf16" for c in p.candidates)


# 7 -------------------------------------------------------------------------------------------
def test_paged_optimizer_states_fit_with_paging_and_name_the_host_memory():
    from vramplan.decide.fit import fit_gpu, paged_bytes

    e = vramplan.estimate("8b", "full", optimizer="paged-adamw", grad_checkpointing=True)
    paged = paged_bytes(e)
    assert paged > 0
    card = replace(resolve_gpu("H100"), usable_bytes=e.device_total_bytes - paged // 2)
    r = fit_gpu(e, card)
    assert r.verdict == "fits with paging" and r.paging_host_bytes == paged - paged // 2


# 8 -------------------------------------------------------------------------------------------
def test_cheapest_offers_counts_that_are_not_powers_of_two():
    from vramplan.decide.fit import COUNTS, cheapest

    assert {3, 5, 6, 7, 24, 40, 48, 56} <= set(COUNTS)
    spec = resolve_model("70b")
    s = vramplan.make_setup(spec, method="full", grad_checkpointing=True, optimizer="adamw-fused")
    found = cheapest(spec, s, limit=50)
    assert any(o.count & (o.count - 1) for o in found)  # e.g. 24 x A100-80GB (ZeRO-3), between 16 and 32
    from vramplan.distributed import estimate_distributed, make_parallel

    for o in found:  # the count before it in COUNTS holds it with no ZeRO stage
        prev = COUNTS[COUNTS.index(o.count) - 1]
        if prev > 1:
            for stage in (0, 1, 2, 3):
                par = make_parallel(gpus=min(prev, 8), nodes=max(1, prev // 8), zero=stage)
                assert estimate_distributed(spec, s, par).per_gpu_device_total_bytes > 0.9 * o.gpu.usable_bytes
    with pytest.raises(VramplanError, match="cannot be laid out"):
        cheapest(spec, s, counts=(1, 12))


# 9 -------------------------------------------------------------------------------------------
def test_mixed_precision_survives_data_parallel_and_json_names_the_weight_dtype():
    pure = vramplan.estimate_parallel("1b", "full", gpus=2, trainer="plain")
    mixed = vramplan.estimate_parallel("1b", "full", gpus=2, precision="mixed", trainer="plain")
    assert mixed.per_gpu_peak_allocated_bytes > pure.per_gpu_peak_allocated_bytes
    d = mixed.to_dict()
    assert d["setup"]["precision"] == "mixed" and d["setup"]["weights_dtype"] == "fp32"
    assert "fp32" in d["parallel"]["precision"]


# 10 ------------------------------------------------------------------------------------------
def test_flash_attention_is_labelled_or_refused():
    e = vramplan.estimate("1b", "lora", attn="flash")
    assert e.setup.attn == "flash"
    r = runner.invoke(app, ["estimate", "--model", "1b", "--method", "lora", "--attn", "flash"])
    assert "FlashAttention-2" in r.output
    with pytest.raises(VramplanError, match="FlashAttention-2.*fp16/bf16 only"):
        vramplan.estimate("1b", "full", attn="flash", precision="fp32")
    with pytest.raises(VramplanError, match="FlashAttention-2"):
        vramplan.estimate("1b", "qlora", attn="flash", trainer="plain")  # kbit-prepared: fp32 attention inputs
    # under Trainer's bf16 autocast the kbit-prepared base's q/k/v reach attention as bf16
    assert vramplan.estimate("1b", "qlora", attn="flash", trainer="hf").setup.attn == "flash"


# 11 ------------------------------------------------------------------------------------------
def test_a_hub_id_alias_says_which_catalogue_entry_answered():
    r = runner.invoke(app, ["estimate", "--model", "meta-llama/Llama-3.3-70B-Instruct", "--method", "qlora"])
    assert "answered by catalogue entry llama-3.1-70b" in " ".join(r.output.split())
    d = json.loads(runner.invoke(app, ["estimate", "--model", "meta-llama/Llama-3.3-70B-Instruct", "--json"]).output)
    assert d["model"]["catalogue_entry"] == "llama-3.1-70b"


def test_offline_hub_lookups_fail_fast():
    t = time.perf_counter()
    p = _cli("estimate", "--model", "nobody-here/not-a-model-xyz", env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "cannot be reached (offline)" in p.stderr
    assert time.perf_counter() - t < 15


# 12 ------------------------------------------------------------------------------------------
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imports(pkg_dir: Path) -> set[str]:
    names: set[str] = set()
    for f in pkg_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_core_dependencies_are_imported_and_bounded():
    deps = PYPROJECT["project"]["dependencies"]
    names = {d.split(">")[0].split("<")[0].split("=")[0] for d in deps}
    assert "numpy" not in names or "numpy" in _imports(ROOT / "vramplan")
    assert "matplotlib" not in names and "matplotlib>=3.7" in PYPROJECT["project"]["optional-dependencies"]["plots"]
    assert any(d.startswith("typer") and "<" in d for d in deps) and any(d.startswith("click") and "<9" in d for d in deps)


def test_profile_extra_matches_what_the_profiler_needs():
    extras = PYPROJECT["project"]["optional-dependencies"]
    prof = extras["profile"]
    for need in ("transformers>=5", "torch>=2.8", "trl==1.16.0", "liger-kernel==0.8.5"):
        assert need in prof
    dist = [d for group in extras.values() for d in group]
    assert any(d.startswith("deepspeed") for d in dist) and any(d.startswith("psutil") for d in dist)


def test_no_python_311_only_datetime_utc():
    for f in (ROOT / "vramplan").rglob("*.py"):
        assert "datetime.UTC" not in f.read_text(), f


def test_plot_without_matplotlib_is_one_clear_line(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from vramplan.cli import main; "
            f"sys.argv = ['vramplan', 'plot', 'validation', '--out', {str(tmp_path / 'v.png')!r}]; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pip install 'vramplan[plots]'" in p.stderr and "Traceback" not in p.stderr
