"""The options table: one definition drives Setup, make_setup, estimate, fit, plan, the CLI and JSON."""

from __future__ import annotations

import pytest

import vramplan
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.options import OPTIONS, trainer_preset
from vramplan.records import load_records, record_estimate
from vramplan.setup import Setup, make_setup


def test_setup_fields_are_exactly_the_options_table():
    assert tuple(Setup.__dataclass_fields__) == tuple(o.name for o in OPTIONS)


def test_json_setup_shows_the_trainer_and_every_resolved_option():
    d = vramplan.estimate("1b", "lora").to_dict()["setup"]
    assert {o.name for o in OPTIONS} <= set(d)
    assert d["trainer"] == "hf"


def test_plain_trainer_keeps_the_reference_loop_defaults():
    s = make_setup(resolve_model("1b"), trainer="plain")
    assert (s.optimizer, s.hold_outputs, s.grad_checkpointing, s.seq_len) == ("adamw", True, False, 2048)


def test_hf_trainer_defaults_to_fused_adamw_without_held_outputs():
    s = make_setup(resolve_model("1b"))
    assert (s.trainer, s.optimizer, s.hold_outputs, s.grad_checkpointing, s.seq_len) == ("hf", "adamw-fused", False, False, 2048)


def test_hf_trainer_checkpoints_a_kbit_prepared_quantised_base():
    spec = resolve_model("1b")
    assert make_setup(spec, method="qlora").grad_checkpointing is True
    assert make_setup(spec, method="qlora", kbit_prepare=False).grad_checkpointing is False
    assert make_setup(spec, method="lora").grad_checkpointing is False


def test_trl_trainer_checkpoints_and_truncates_to_1024():
    s = make_setup(resolve_model("1b"), trainer="trl", method="lora")
    assert (s.grad_checkpointing, s.seq_len, s.optimizer, s.hold_outputs) == (True, 1024, "adamw-fused", False)


def test_trl_keeps_a_quantised_bases_other_weights_in_16_bit_unless_told():
    # SFTTrainer hands the k-bit model to get_peft_model unprepared (TRL 1.16): no fp32 upcast
    spec = resolve_model("8b")
    assert make_setup(spec, trainer="trl", method="qlora").kbit_prepare is False
    assert make_setup(spec, trainer="trl", method="qlora", kbit_prepare=True).kbit_prepare is True
    trl = vramplan.estimate("8b", "qlora", trainer="trl")
    prepared = vramplan.estimate("8b", "qlora", trainer="trl", kbit_prepare=True)
    assert trl.peak_allocated_bytes < prepared.peak_allocated_bytes
    # measured: the t12 TRL QLoRA runs, recorded unprepared, within 2% of their estimates
    for rec in load_records():
        s = rec["setup"]
        if s.get("name", "").startswith("t12-") and s["trainer"] == "trl" and s["method"] == "qlora":
            assert s["kbit_prepare"] is False
            assert abs(record_estimate(rec).peak_allocated_bytes / rec["peak_allocated"] - 1) < 0.02, s["name"]


def test_an_explicit_option_beats_the_trainer_preset():
    s = make_setup(resolve_model("1b"), trainer="trl", seq_len=4096, grad_checkpointing=False, optimizer="adamw",
                   hold_outputs=True)
    assert (s.seq_len, s.grad_checkpointing, s.optimizer, s.hold_outputs) == (4096, False, "adamw", True)


def test_trainer_preset_reports_what_it_changes():
    assert trainer_preset("trl", method="lora") == {"optimizer": "adamw-fused", "seq_len": 1024,
                                                    "grad_checkpointing": True, "hold_outputs": False,
                                                    "kbit_prepare": False}
    assert trainer_preset("plain") == {}


def test_presets_never_make_a_default_setup_invalid():
    spec = resolve_model("1b")
    for trainer in ("hf", "trl", "plain"):
        for method in ("full", "lora", "qlora", "galore", "prefix", "prompt", "ia3"):
            make_setup(spec, trainer=trainer, method=method)


def test_records_without_trainer_re_estimate_as_the_plain_loop():
    rec = next(r for r in load_records() if r.get("status") == "ok" and "trainer" not in r["setup"])
    e = record_estimate(rec)
    assert e.setup.trainer == "plain"
    for k, v in rec["setup"].items():
        if k in Setup.__dataclass_fields__ and k != "lora_targets":
            assert getattr(e.setup, k) == v, k


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"trainer": "axolotl"}, "unknown trainer 'axolotl'"),
    ({"checkpoint_offload": True, "trainer": "plain"}, "checkpoint_offload .* needs grad_checkpointing"),
    ({"use_dora": True, "method": "full"}, "use_dora is a LoRA variant"),
    ({"liger": "yes"}, "liger must be true or false"),
    ({"batch_sise": 2}, "unknown option 'batch_sise': did you mean batch_size"),
])
def test_new_options_are_validated(kwargs, pattern):
    with pytest.raises(VramplanError, match=pattern):
        vramplan.estimate("1b", **kwargs)


def test_every_api_entry_point_takes_every_option():
    opts = {"trainer": "plain", "use_dora": True, "liger": True, "activation_offload": True, "grad_checkpointing": True,
            "checkpoint_offload": True}
    assert vramplan.estimate("1b", "lora", **opts).setup.use_dora
    assert vramplan.fit("1b", "lora", gpus="H100", **opts).estimate.setup.liger
    assert vramplan.estimate_parallel("1b", "lora", gpus=2, **opts).single.setup.activation_offload
    assert vramplan.plan("1b", "H100", "lora", limit=1, **opts).request.checkpoint_offload


@pytest.mark.parametrize("trainer", ["hf", "trl", "plain"])
def test_a_record_of_any_trainer_re_estimates_its_own_setup(trainer):
    from vramplan.records import _spec_setup
    from vramplan.setup import profiler_setup

    spec = resolve_model("1b")
    s = make_setup(spec, trainer=trainer, method="qlora", lora_targets="attention", batch_size=2)
    rec = {"setup": profiler_setup(spec, s, name="x", steps=3)}
    assert _spec_setup(rec)[1] == s
