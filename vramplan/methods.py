"""Fine-tuning methods behind one small interface: what is trainable, in which dtype, and what it
adds to the model. QLoRA is LoRA on a 4-bit base (composition, not a copy)."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ArchConfig
from vramplan.layout import Layout
from vramplan.setup import Setup


@dataclass(frozen=True)
class Trainable:
    """Trainable parameters: how many, their dtype's bytes, and the shapes optimizers care about."""

    params: int
    bytes_per_param: int
    tensors: int  # number of trainable tensors (per-tensor optimizer overheads)
    largest: int  # numel of the largest trainable tensor
    matrices: tuple[tuple[int, int, int], ...] = ()  # (rows, cols, count) of 2-D trainable matrices
    base_trainable: bool = False  # the base model's own weights are trained (full, galore)
    other_matrices: tuple[tuple[int, int, int], ...] = ()  # 2-D trainables outside the layers (embeddings)

    @property
    def bytes(self) -> int:
        return self.params * self.bytes_per_param


# peft casts adapter weights to fp32 when the base is fp16/bf16 (get_peft_model(...,
# autocast_adapter_dtype=True), peft/tuners/tuners_utils.py cast_adapter_dtype); the reference
# records show trainable_dtypes float32 for LoRA, prefix, prompt tuning and IA3.
ADAPTER_BYTES = 4


def adapter_bytes(setup: Setup) -> int:
    """fp32, except on a quantised base that `prepare_model_for_kbit_training` did not prepare
    (TRL's SFTTrainer never calls it): peft then builds the adapters in the bnb layer's compute
    dtype (measured: tr-l1b-trl-qlora-b2s1024, trainable dtypes bfloat16)."""
    return 2 if (setup.quantised and not setup.kbit_prepare and setup.trainer in ("hf", "trl")) else ADAPTER_BYTES


def lora_params(lay: Layout, setup: Setup) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """LoRA A (r x d_in) and B (d_out x r) for each targeted Linear in every layer, summed over
    the layer groups; fused MoE parameters peft targets through ParamWrapper get A
    (k*r*E x d_in) and B (d_out x k*r*E) (see layout.ParamTarget)."""
    r = setup.lora_rank
    mats = []
    total = 0
    for g in lay.groups:
        for lm in g.linears:
            if lm.module in setup.lora_targets:
                total += r * (lm.d_in + lm.d_out) * g.count
                mats += [(r, lm.d_in, g.count), (lm.d_out, r, g.count)]
                if setup.use_dora:
                    # DoRA's magnitude vector, one per output row (peft lora/dora.py
                    # DoraLinearLayer.update_layer: nn.Parameter(weight_norm))
                    total += lm.d_out * g.count
        for pt in g.param_targets:
            if pt.module in setup.lora_targets:
                rr = pt.rank_mult * r * pt.experts
                total += rr * (pt.d_in + pt.d_out) * g.count
                mats += [(rr, pt.d_in, g.count), (pt.d_out, rr, g.count)]
    return total, tuple(mats)


def prefix_params(arch: ArchConfig, setup: Setup) -> int:
    """peft PrefixEncoder: an embedding of num_virtual_tokens x (layers*2*token_dim); token_dim is
    the key/value width (kv_heads * head_dim). With prefix_projection, an embedding of token_dim
    then Linear(token_dim, token_dim) + Tanh + Linear(token_dim, layers*2*token_dim)
    (peft/tuners/prefix_tuning/model.py; encoder_hidden_size defaults to token_dim)."""
    t = setup.prefix_tokens
    tok = arch.kv_dim
    out = arch.layers * 2 * tok
    if not setup.prefix_projection:
        return t * out
    return t * tok + (tok * tok + tok) + (tok * out + out)


def ia3_params(lay: Layout, arch: ArchConfig) -> int:
    """peft IA3 defaults for decoder LMs: scale vectors on k_proj and v_proj outputs and on the
    down projection's input (peft TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)."""
    if arch.family == "gpt2":
        return (3 * arch.hidden + arch.intermediate) * lay.layers  # c_attn out + mlp.c_proj in
    total = 0
    for g in lay.groups:
        for lm in g.linears:
            if lm.module in ("k_proj", "v_proj", "c_attn", "qkv_proj"):
                total += lm.d_out * g.count
            elif lm.module in ("down_proj", "mlp.c_proj", "fc2"):
                total += lm.d_in * g.count
    return total


def trainable(lay: Layout, arch: ArchConfig, setup: Setup, dense_bytes: int) -> Trainable:
    m = setup.method
    if m in ("full", "galore"):
        mats = tuple((lm.d_out, lm.d_in, g.count) for g in lay.groups for lm in g.linears)
        other = [(arch.vocab, arch.hidden, 1 if arch.tied else 2)]
        if arch.family == "gpt2":
            other.append((arch.max_positions, arch.hidden, 1))
        return Trainable(lay.params_total, dense_bytes, 0, lay.largest_tensor, mats, base_trainable=True,
                         other_matrices=tuple(other))
    if m in ("lora", "qlora"):
        n, mats = lora_params(lay, setup)
        largest = max(a * b for a, b, _ in mats)
        return Trainable(n, adapter_bytes(setup), sum(c for *_, c in mats), largest, mats)
    if m == "prefix":
        n = prefix_params(arch, setup)
        return Trainable(n, ADAPTER_BYTES, 1 if not setup.prefix_projection else 5, n)
    if m == "prompt":
        n = setup.prefix_tokens * arch.hidden
        return Trainable(n, ADAPTER_BYTES, 1, n)
    if m == "ia3":
        n = ia3_params(lay, arch)
        return Trainable(n, ADAPTER_BYTES, 3 * lay.layers, max(arch.intermediate, arch.kv_dim))
    if m == "bitfit":
        n = lay.biases_total + (lay.final_norm_params - arch.hidden if arch.family == "gpt2" else 0)
        return Trainable(n, dense_bytes, 0, arch.intermediate)
    raise AssertionError(m)
