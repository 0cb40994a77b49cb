from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vramplan.cli import app

runner = CliRunner()


def test_models_and_gpus_print_tables_and_json():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and "llama-3.1-70b" in r.output and "70b" in r.output
    rows = json.loads(runner.invoke(app, ["models", "--json"]).output)
    assert {"name", "params", "default_for", "source"} <= set(rows[0])
    g = json.loads(runner.invoke(app, ["gpus", "--json"]).output)
    assert any(x["name"] == "H100-SXM-80GB" for x in g)


def test_estimate_json_is_one_object_with_the_documented_schema():
    r = runner.invoke(app, ["estimate", "--model", "70b", "--method", "qlora", "--grad-checkpointing", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"]["name"] == "llama-3.1-70b"
    assert d["setup"]["dtype"] == "nf4" and d["setup"]["double_quant"] is True
    assert d["peak_phase"] in d["phases"]


def test_estimate_prints_breakdown_totals_and_fit_lines():
    r = runner.invoke(app, ["estimate", "--model", "8b", "--method", "lora", "--grad-checkpointing"])
    assert r.exit_code == 0
    for s in ("breakdown at the peak", "peak allocated", "device total", "H100-SXM-80GB"):
        assert s in r.output


def test_fit_and_plan_commands():
    r = runner.invoke(app, ["fit", "--model", "8b", "--method", "qlora", "--gpu", "4090", "--gpu", "a100", "--json"])
    assert r.exit_code == 0
    assert len(json.loads(r.output)["gpus"]) == 2
    r = runner.invoke(app, ["plan", "--model", "8b", "--gpu", "rtx-4090", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["fits"]


def test_validate_report_needs_no_gpu():
    r = runner.invoke(app, ["validate", "--report", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output)) >= 60


@pytest.mark.parametrize(("args", "needle"), [
    (["estimate", "--model", "llama-9b"], "unknown model 'llama-9b'"),
    (["estimate", "--batch-size", "-1"], "batch_size must be a positive integer, got -1"),
    (["estimate", "--method", "lora", "--lora-rank", "99999"], "lora_rank 99999 exceeds"),
    (["estimate", "--method", "qlora", "--dtype", "bf16"], "qlora needs a 4-bit base"),
    (["estimate", "--model", "/nonexistent/config.json"], "unknown model"),
    (["fit", "--gpu", "H1000"], "unknown GPU 'H1000'"),
    (["plan", "--gpu", "nope"], "unknown GPU"),
    (["profile", "--model", "1b"], "CUDA"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, needle):
    p = subprocess.run([sys.executable, "-m", "vramplan.cli", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr.replace("\n", " ")
    assert "Traceback" not in p.stderr + p.stdout


def test_malformed_config_json_from_the_cli(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"model_type": "llama", ')
    p = subprocess.run([sys.executable, "-m", "vramplan.cli", "estimate", "--model", str(f)], capture_output=True, text=True)
    assert p.returncode == 2 and "malformed config.json" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(("text", "needle"), [("nope: [", "bad cases file"), ("other: 1\n", "missing key 'cases'"),
                                              ("cases:\n  - {name: y, model: 1b, batch_size: -3}\n", "batch_size must be")])
def test_bad_cases_file_is_one_line_exit_2(tmp_path, text, needle):
    f = tmp_path / "cases.yaml"
    f.write_text(text)
    p = subprocess.run([sys.executable, "-m", "vramplan.cli", "validate", str(f)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
