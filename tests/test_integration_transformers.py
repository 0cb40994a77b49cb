"""MemoryPreflight inside a real transformers Trainer (CPU: the prediction path; CUDA: measured
against predicted), and estimate_from_trainer from live config objects and from dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import vramplan  # noqa: E402
from vramplan.errors import VramplanError  # noqa: E402
from vramplan.integrations.transformers import MemoryPreflight, PreflightOOMError  # noqa: E402

SEQ = 32


def tiny_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_dataset(n: int = 8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (n, SEQ), generator=g)
    return [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]


def train_args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 2, "report_to": [],
            "save_strategy": "no", "logging_strategy": "no", "use_cpu": not torch.cuda.is_available(), "disable_tqdm": True}
    return transformers.TrainingArguments(**{**base, **kw})


def run_trainer(model, args, cb):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tiny_dataset(), callbacks=[cb])
    trainer.train()
    return trainer


@pytest.mark.slow
def test_callback_predicts_inside_a_real_trainer_for_a_full_finetune(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config())
    cb = MemoryPreflight(seq_len=SEQ, free_bytes=80 * 2**30)
    trainer = run_trainer(model, train_args(tmp_path, gradient_accumulation_steps=2), cb)
    assert trainer.state.global_step == 2
    e = cb.estimate
    assert e is not None and e.params_total == sum(p.numel() for p in model.parameters())
    s = e.setup
    assert (s.method, s.batch_size, s.seq_len, s.grad_accum, s.trainer, s.dtype, s.precision) == \
        ("full", 2, SEQ, 2, "hf", "fp32", "fp32")
    assert s.optimizer == "adamw-fused" and s.grad_checkpointing is False  # TrainingArguments defaults
    assert e.peak_allocated_bytes > 0
    if not torch.cuda.is_available():
        assert cb.comparison is None  # nothing measured without CUDA


@pytest.mark.slow
def test_callback_reads_the_live_peft_config(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
    cb = MemoryPreflight(seq_len=SEQ, free_bytes=80 * 2**30)
    run_trainer(model, train_args(tmp_path), cb)
    s = cb.estimate.setup
    assert (s.method, s.lora_rank, s.lora_alpha, s.lora_targets) == ("lora", 4, 8.0, ("q_proj", "v_proj"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cb.estimate.params_trainable == trainable
    assert cb.read["read"]["peft_config.r"] == 4
    json.dumps(cb.read)


@pytest.mark.slow
def test_callback_raises_on_oom_naming_the_cheapest_change(tmp_path):
    model = transformers.LlamaForCausalLM(tiny_config())
    cb = MemoryPreflight(seq_len=SEQ, free_bytes=1, raise_on_oom=True)
    with pytest.raises(PreflightOOMError, match="will not fit .* cheapest change that fits"):
        run_trainer(model, train_args(tmp_path), cb)


@pytest.mark.slow
def test_callback_warns_when_the_step_will_not_fit(tmp_path):
    model = transformers.LlamaForCausalLM(tiny_config())
    est = vramplan.estimate_from_trainer(model.config, train_args(tmp_path), seq_len=SEQ)
    cb = MemoryPreflight(seq_len=SEQ, free_bytes=est.device_total_bytes - 1)
    with pytest.warns(ResourceWarning, match="cheapest change that fits: "):
        run_trainer(model, train_args(tmp_path), cb)


@pytest.mark.gpu
def test_callback_measures_and_appends_a_record_on_cuda(tmp_path):
    from vramplan.records import load_records, record_estimate

    model = transformers.LlamaForCausalLM(tiny_config()).cuda()
    out = tmp_path / "rec.jsonl"
    cb = MemoryPreflight(seq_len=SEQ, measure_steps=2, record_path=out)
    run_trainer(model, train_args(tmp_path / "o"), cb)
    assert cb.comparison is not None and cb.comparison.measured_bytes > 0
    rec = load_records([out])[0]
    assert rec["peak_allocated"] == cb.comparison.measured_bytes and len(rec["steps"]) == 2
    assert record_estimate(rec).peak_allocated_bytes == cb.comparison.predicted_bytes


def test_estimate_from_trainer_takes_dicts():
    cfg = tiny_config().to_dict()
    args = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "bf16": True, "optim": "adamw_bnb_8bit",
            "gradient_checkpointing": True}
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    e = vramplan.estimate_from_trainer(cfg, args, lora, seq_len=128)
    s = e.setup
    assert (s.method, s.batch_size, s.grad_accum, s.seq_len, s.optimizer, s.grad_checkpointing, s.lora_rank) == \
        ("lora", 4, 2, 128, "adamw-8bit", True, 8)
    assert (s.precision, s.dtype) == ("mixed", "bf16")  # fp32 weights (no dtype in config) under bf16 autocast


def test_estimate_from_trainer_reads_a_4bit_quantization_config():
    cfg = {**tiny_config().to_dict(), "dtype": "bfloat16",
           "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                   "bnb_4bit_use_double_quant": True}}
    e = vramplan.estimate_from_trainer(cfg, {"per_device_train_batch_size": 1}, {"peft_type": "LORA", "r": 16},
                                       seq_len=64)
    s = e.setup
    assert (s.method, s.dtype, s.double_quant, s.lora_targets) == ("qlora", "nf4", True, ("q_proj", "v_proj"))
    assert s.quant_storage == "uint8"  # BitsAndBytesConfig's default
    cfg["quantization_config"]["bnb_4bit_quant_storage"] = "bfloat16"  # as the FSDP-QLoRA recipe loads
    bf16 = vramplan.estimate_from_trainer(cfg, {"per_device_train_batch_size": 1}, {"peft_type": "LORA", "r": 16},
                                          seq_len=64)
    assert bf16.setup.quant_storage == "bf16" and bf16.peak_allocated_bytes == e.peak_allocated_bytes  # same bytes


def test_estimate_from_trainer_trl_sft_config_dict_takes_trl_defaults():
    from vramplan.trainer_bridge import trainer_config

    tc = trainer_config(tiny_config().to_dict(), {"dataset_text_field": "text", "max_length": 128,
                                                  "gradient_checkpointing": True, "per_device_train_batch_size": 2})
    assert (tc.source, tc.options["trainer"], tc.options["seq_len"]) == ("trl", "trl", 128)


def test_estimate_from_trainer_refuses_unmodelled_optimizer_and_quantised_full():
    cfg = tiny_config().to_dict()
    with pytest.raises(VramplanError, match="key 'optim': optimizer 'lomo'"):
        vramplan.estimate_from_trainer(cfg, {"optim": "lomo"}, seq_len=64)
    q = {**cfg, "quantization_config": {"load_in_8bit": True}}
    with pytest.raises(VramplanError, match="pass its peft_config"):
        vramplan.estimate_from_trainer(q, {}, seq_len=64)


def test_importing_vramplan_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = "import sys, vramplan; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# Records MemoryPreflight appended on an NVIDIA H100 80GB HBM3 (driver 580.159.04, torch 2.11.0+cu130,
# transformers 5.17.0, peft 0.21.0), three transformers Trainer runs of
# `python -m vramplan.integrations.selfcheck` (random weights and tokens, bf16, fused AdamW).
CALLBACK_RECORDS = Path(__file__).parent / "data" / "train_configs" / "measured_h100_trainer_callback.jsonl"
# LoRA without checkpointing under the Trainer's bf16 autocast was over-estimated by 14.8% when
# recorded (adapter casts under autocast over bf16 weights); the other two within 1%.
CALLBACK_TOLERANCE = {"trainer-full-qwen0.5b-b4s512": 0.02, "trainer-lora-1b-b4s1024": 0.16,
                      "trainer-lora-ckpt-1b-b8s1024": 0.02}


def test_callback_records_from_the_card_re_estimate_within_their_band():
    from vramplan.records import load_records, record_estimate

    recs = load_records([CALLBACK_RECORDS])
    assert {r["setup"]["name"] for r in recs} == set(CALLBACK_TOLERANCE)
    for r in recs:
        assert r["status"] == "ok" and r["gpu"].startswith("NVIDIA H100") and len(r["steps"]) == 3
        assert r["setup"]["trainer"] == "hf" and r["train_config"]["source"] == "hf"
        err = record_estimate(r).peak_allocated_bytes / r["peak_allocated"] - 1
        assert abs(err) <= CALLBACK_TOLERANCE[r["setup"]["name"]], (r["setup"]["name"], err)


def test_selfcheck_launches_multi_gpu_cases_under_torchrun_and_single_ones_alone():
    from vramplan.integrations.selfcheck import CASES, DIST_CASES, case_command, main

    out = Path("/tmp/sc.jsonl")
    dist = case_command("trainer-zero3-lora-ckpt-1b-b4s1024", out, 4)
    assert dist[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert dist[-2:] == ["trainer-zero3-lora-ckpt-1b-b4s1024", str(out)]
    one = case_command("trainer-lora-1b-b4s1024", out, 4)
    assert "torch.distributed.run" not in one and one[-2:] == ["trainer-lora-1b-b4s1024", str(out)]
    assert not set(CASES) & set(DIST_CASES)
    assert main([str(out), "trainer-nope"]) == 2  # an unknown case is refused before anything runs


# Records MemoryPreflight appended inside real multi-GPU Trainer runs on two NVIDIA H200s of one
# host (torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, accelerate 1.15.0, DeepSpeed 0.19.8),
# `python -m vramplan.integrations.selfcheck --gpus 2`: each rank read the engine and world size
# from its live arguments and torchrun's environment, and predicted, measured and recorded its own
# per-GPU figures. Under ZeRO-3 the Trainer's LoRA run is 9.8% under in peak allocated (released
# weights that stay allocated while the host runs ahead; README "Not yet right"), its reserved exact.
DIST_CALLBACK_RECORDS = Path(__file__).parent / "data" / "train_configs" / "measured_h200x2_trainer_callback.jsonl"
DIST_CALLBACK_BANDS = {"trainer-ddp-lora-1b-b4s1024": (-0.02, 0.0), "trainer-zero3-lora-ckpt-1b-b4s1024": (-0.02, 0.0)}
# the callback's on-card prediction for the ZeRO-3 run (-9.8%) predates the parameters ZeRO-3 keeps
# gathered at the turn to backward (distributed.zero3_live_gathered_bytes); re-estimated, it is -0.5%
PREDICTED_BY_AN_OLDER_MODEL = {"trainer-zero3-lora-ckpt-1b-b4s1024"}


def test_callback_records_from_a_two_gpu_trainer_re_estimate_per_gpu_within_their_band():
    from vramplan.records import is_distributed, load_records, record_totals

    recs = load_records([DIST_CALLBACK_RECORDS])
    assert sorted((r["setup"]["name"], r["rank"]) for r in recs) == sorted(
        (n, k) for n in DIST_CALLBACK_BANDS for k in (0, 1))
    for r in recs:
        assert is_distributed(r) and r["world_size"] == 2 and r["gpu"].startswith("NVIDIA H200")
        t = record_totals(r)
        # what the callback predicted on the card is what the records path re-estimates now
        if r["setup"]["name"] in PREDICTED_BY_AN_OLDER_MODEL:
            assert t.peak_allocated > r["predicted_peak_allocated"]
        else:
            assert t.peak_allocated == pytest.approx(r["predicted_peak_allocated"], rel=0.002)
        lo, hi = DIST_CALLBACK_BANDS[r["setup"]["name"]]
        assert lo <= t.peak_allocated / r["peak_allocated"] - 1 <= hi, r["setup"]["name"]
        assert abs(t.peak_reserved / r["peak_reserved"] - 1) <= 0.04
