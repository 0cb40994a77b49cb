"""Bad input: one clear error naming the value and what is allowed."""

from __future__ import annotations

import pytest

from vramplan import estimate
from vramplan.errors import VramplanError


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
    ({"seq_len": 0}, "seq_len must be a positive integer"),
    ({"method": "lora", "lora_rank": 4096}, r"lora_rank 4096 exceeds .*\(512\).*1\.\.512"),
    ({"method": "qlora", "dtype": "bf16"}, "qlora needs a 4-bit base"),
    ({"method": "full", "dtype": "nf4"}, "cannot be nf4"),
    ({"method": "galore", "dtype": "nf4"}, "cannot be nf4"),
    ({"method": "galore", "optimizer": "sgd"}, "galore supports optimizers"),
    ({"optimizer": "adamw8"}, "unknown optimizer 'adamw8': did you mean"),
    ({"method": "lorra"}, "unknown method 'lorra': did you mean lora"),
    ({"method": "prefix", "grad_checkpointing": True}, "prefix does not work with gradient checkpointing"),
    ({"method": "bitfit"}, "bitfit trains bias terms"),
    ({"method": "lora", "lora_targets": "q_proj,c_attn"}, "unknown LoRA target module 'c_attn'"),
    ({"attn": "flash2"}, "unknown attention implementation"),
    ({"precision": "mixed", "dtype": "fp32"}, "precision mixed"),
])
def test_invalid_setups_raise_one_line_errors(kwargs, pattern):
    with pytest.raises(VramplanError, match=pattern) as e:
        estimate("llama-3.2-1b", **kwargs)
    assert "\n" not in str(e.value)


def test_gpt2_sequence_beyond_learned_positions_is_rejected():
    with pytest.raises(VramplanError, match="learned positions"):
        estimate("gpt2", seq_len=2048)


def test_lora_targets_resolve_like_peft():
    e = estimate("llama-3.2-1b", method="lora", lora_targets="attention")
    assert e.setup.lora_targets == ("k_proj", "o_proj", "q_proj", "v_proj")
    e = estimate("llama-3.2-1b", method="lora")
    assert set(e.setup.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
