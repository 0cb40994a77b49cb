"""A training setup: what is trained, how, on what shapes. Validated on construction; the same
object drives the estimator and (through to_dict) the profiler."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vramplan.arch import ModelSpec
from vramplan.errors import VramplanError, unknown
from vramplan.layout import layout
from vramplan.options import (  # noqa: F401 (re-exported: the choices are the options table's)
    ATTNS,
    DTYPES,
    GALORE_OPTIMIZERS,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTISED,
    TRAINERS,
    UNSET,
    SetupFields,
    resolve,
)

# Methods that train adapters on a frozen base, and so go with a quantised base.
ADAPTER_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")
# More tokens than this in one micro-batch is no fine-tuning step (and prints absurd sizes).
MAX_TOKENS = 1 << 26


@dataclass(frozen=True)
class Setup(SetupFields):
    """A resolved, validated setup. Its fields are the rows of vramplan.options.OPTIONS; build it
    with make_setup (which fills trainer presets and defaults)."""

    @property
    def quantised(self) -> bool:
        return self.dtype in QUANTISED

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def weights_dtype(self) -> str:
        """How the base weights are stored: mixed precision keeps fp32 masters of a bf16/fp16 setup."""
        return "fp32" if self.precision == "mixed" else self.dtype

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["weights_dtype"] = self.weights_dtype
        return d


def _posint(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VramplanError(f"{name} must be a positive integer, got {value!r}")
    return value


# peft 0.21 utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING: for the model types
# whose MoE transformers 5 fused (ArchConfig.peft_moe_pattern), "all-linear" resolves to the
# nn.Linear leaf names plus these v4 names, and every target with one of these leaf names is moved
# to `target_parameters` (router weight, fused experts) -- so a dense MLP or shared expert whose
# Linear shares such a name (DeepSeek-V3 layer 0 gate_proj, shared_experts.*) gets no adapter.
# Verified on tiny Mixtral/Qwen3-MoE/DeepSeek-V3/Llama4/gpt-oss models built on CPU.
PEFT_MOE_V4_NAMES = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def resolve_targets(model: ModelSpec, targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target modules as peft 0.21 on transformers 5 resolves them: 'all-linear' (every
    nn.Linear in the decoder layers -- never lm_head -- and, for fused-MoE types, the router weight
    and fused experts as target parameters), 'attention', or names as in the HF model
    ('q_proj,v_proj', 'experts.gate_up_proj')."""
    lay = layout(model)
    linear = {lm.module for g in lay.groups for lm in g.linears}
    params = lay.param_target_modules
    available = linear | params
    if not available:
        raise VramplanError(f"model {model.name!r} has no Linear modules LoRA can target")
    # Llama4Router is an nn.Linear whose forward returns (scores, logits): peft's lora.Linear adds
    # its delta to that tuple and the forward fails ("'tuple' object has no attribute 'dtype'",
    # peft 0.21 on a tiny llama4_text with target_modules="all-linear"), so all-linear leaves it out
    unwrappable = {lm.module for g in lay.groups for lm in g.linears if lm.kind == "router"} if model.arch.router_linear else set()
    if isinstance(targets, str):
        if targets in ("all-linear", "all"):
            moved = set(PEFT_MOE_V4_NAMES.get(model.arch.peft_moe_pattern or "", ()))
            return tuple(sorted((linear - moved - unwrappable) | params))
        if targets in ("attention", "attn"):
            return tuple(sorted({lm.module for g in lay.groups for lm in g.linears if lm.kind == "attn"}))
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        if t in unwrappable:
            raise VramplanError(f"LoRA target {t!r} is {model.arch.model_type}'s router, whose forward returns a tuple: "
                                "peft's LoRA layer cannot wrap it; leave it out of lora_targets")
        if t not in available:
            raise unknown("LoRA target module", t, [*sorted(available), "all-linear", "attention"])
        out.append(t)
    if not out:
        raise VramplanError("lora_targets is empty; allowed: all-linear, attention, or module names")
    return tuple(dict.fromkeys(out))


def _param_target_dropout(model: ModelSpec, targets: tuple[str, ...], dropout: float, *, given: bool) -> float:
    """peft 0.21 wraps a target *parameter* (fused experts, a router weight) in lora.ParamWrapper,
    which raises "lora.ParamWrapper does not work with lora_dropout != 0" (peft/tuners/lora/layer.py;
    verified on tiny Qwen3-MoE/Mixtral/DeepSeek-V3 with target_modules="all-linear"). With such
    targets the default dropout is 0; a dropout the user gave is refused as peft refuses it."""
    hit = sorted(layout(model).param_target_modules.intersection(targets))
    if not hit or dropout == 0:
        return dropout
    if given:
        raise VramplanError(f"lora_dropout {dropout!r} with LoRA on fused expert/router parameters ({', '.join(hit)}): "
                            "peft's ParamWrapper needs lora_dropout 0; pass lora_dropout 0, or lora_targets attention")
    return 0.0


def make_setup(model: ModelSpec, **opts: Any) -> Setup:
    """Validate user options against the model and return the resolved Setup. Options are the rows
    of vramplan.options.OPTIONS; one left out (or None where the table allows) takes its trainer
    preset, else its default."""
    o = resolve(opts)
    method, dtype, precision, optimizer = o["method"], o["dtype"], o["precision"], o["optimizer"]
    grad_checkpointing = o["grad_checkpointing"]
    lora_rank, lora_dropout, lora_targets = o["lora_rank"], o["lora_dropout"], o["lora_targets"]
    galore_rank, prefix_tokens = o["galore_rank"], o["prefix_tokens"]
    _check_sizes(model, o)
    _check_techniques(model, o)
    if method == "qlora" and dtype not in ("nf4", "fp4"):
        raise VramplanError(f"method qlora needs a 4-bit base (dtype nf4 or fp4), got dtype {dtype!r}; for LoRA on a {dtype} base use method lora")
    if dtype in QUANTISED and method not in ADAPTER_METHODS:
        raise VramplanError(f"method {method!r} trains the base weights, which cannot be {dtype}; "
                            f"with a quantised base use one of: {', '.join(ADAPTER_METHODS)}")
    if precision == "fp32" and dtype not in ("fp32", *QUANTISED):
        raise VramplanError(f"precision fp32 keeps weights in fp32, but dtype is {dtype!r}; use dtype fp32 or precision pure/mixed")
    if precision == "mixed" and dtype == "fp32":
        raise VramplanError("precision mixed computes in bf16/fp16: give dtype bf16 or fp16 (weights are kept in fp32)")
    if method == "galore" and optimizer not in GALORE_OPTIMIZERS:
        raise VramplanError(f"method galore supports optimizers {', '.join(GALORE_OPTIMIZERS)}, got {optimizer!r}")
    if method == "bitfit" and not layout(model).layer_biases:
        raise VramplanError(f"method bitfit trains bias terms, and {model.name} has none")
    targets: tuple[str, ...] = ()
    if method in ("lora", "qlora"):
        _posint("lora_rank", lora_rank)
        targets = resolve_targets(model, lora_targets)
        # peft itself never bounds the rank (r=8 on a 4-expert router and on Qwen2-MoE's 1-wide
        # shared_expert_gate both build); vramplan refuses a rank above the smallest attention/MLP
        # projection, where LoRA stops being low-rank, and lets routers and gates through.
        dims = [min(lm.d_in, lm.d_out) for g in layout(model).groups for lm in g.linears
                if lm.module in targets and lm.kind != "router"]
        limit = min(dims) if dims else lora_rank
        if lora_rank > limit:
            raise VramplanError(f"lora_rank {lora_rank} exceeds the smallest target matrix dimension ({limit}); allowed: 1..{limit}")
        if not 0.0 <= lora_dropout < 1.0:
            raise VramplanError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        lora_dropout = _param_target_dropout(model, targets, lora_dropout, given=opts.get("lora_dropout", UNSET) is not UNSET)
    if method == "galore":
        _posint("galore_rank", galore_rank)
        limit = min(min(lm.d_in, lm.d_out) for lm in layout(model).linears)
        if galore_rank > limit:
            raise VramplanError(f"galore_rank {galore_rank} exceeds the smallest projected matrix dimension ({limit})")
    if method in ("prefix", "prompt"):
        _posint("prefix_tokens", prefix_tokens)
    if method == "prefix" and grad_checkpointing:
        # peft raises "PREFIX_TUNING does not work with gradient checkpointing" (measured:
        # data/measurements q05-prefix-ckpt-b8s512)
        raise VramplanError("method prefix does not work with gradient checkpointing (peft refuses it); drop --grad-checkpointing")
    setup = Setup(**{**o, "lora_targets": targets, "lora_alpha": float(o["lora_alpha"]), "lora_dropout": lora_dropout})
    _check_flash_attention(model, setup)
    return setup


def _check_sizes(model: ModelSpec, o: dict[str, Any]) -> None:
    """Lengths the model can take and sizes that are a training step."""
    seq_len, limit = o["seq_len"], model.arch.max_positions
    if model.arch.family == "gpt2" and seq_len > limit:
        raise VramplanError(f"seq_len {seq_len} exceeds {model.name}'s learned positions ({limit})")
    if seq_len > limit and not o["long_context"]:
        raise VramplanError(f"seq_len {seq_len} exceeds {model.name}'s max_position_embeddings ({limit}); "
                            f"allowed: 1..{limit}, or pass long_context (--long-context) for rope scaling")
    if o["batch_size"] * seq_len > MAX_TOKENS:
        raise VramplanError(f"batch_size x seq_len = {o['batch_size'] * seq_len:,} tokens per micro-batch; "
                            f"allowed: at most {MAX_TOKENS:,}")


def _check_flash_attention(model: ModelSpec, setup: Setup) -> None:
    """attn "flash" is FlashAttention-2 (transformers attn_implementation="flash_attention_2"). It
    saves q, k, v, the output and softmax_lse, the tensors SDPA's flash kernel saves, and is costed
    as that kernel. Where the model would not run that kernel, refuse rather than cost another."""
    if setup.attn != "flash":
        return
    from vramplan.activations import attention_kernel, stream_dtypes  # imports Setup: load lazily

    if setup.method == "prefix":
        raise VramplanError("attn flash (FlashAttention-2) with prefix tuning's attention mask is not modelled; use --attn sdpa")
    if model.arch.attn_sinks:
        raise VramplanError(f"attn flash: FlashAttention-2 has no attention sinks, which {model.name} "
                            f"({model.arch.model_type}) needs; use --attn eager (transformers' default for it)")
    if attention_kernel(model.arch, setup, stream_dtypes(setup)).name != "flash":
        raise VramplanError("attn flash (FlashAttention-2) runs in fp16/bf16 only, and this setup's attention inputs are fp32 "
                            "(precision fp32, or a kbit-prepared quantised base outside Trainer's autocast); use --attn sdpa, "
                            "or --no-kbit-prepare")


def _check_techniques(model: ModelSpec, o: dict[str, Any]) -> None:
    """Options that need another option, or a method, to mean anything."""
    if o["checkpoint_offload"] and not o["grad_checkpointing"]:
        raise VramplanError("checkpoint_offload offloads the checkpointed layer inputs: it needs grad_checkpointing "
                            "(--grad-checkpointing)")
    if o["use_dora"] and o["method"] not in ("lora", "qlora"):
        raise VramplanError(f"use_dora is a LoRA variant: it needs method lora or qlora, got method {o['method']!r}")
    if o["liger"] and model.arch.family == "gpt2":
        raise VramplanError(f"liger has no kernels for {model.name} (model type gpt2); drop --liger")


def profiler_setup(model: ModelSpec, setup: Setup, **extra: Any) -> dict[str, Any]:
    """The JSON the profiler worker takes: the setup plus the model's HF config."""
    d = setup.to_dict()
    d.update(model=model.name, hf_config=model.arch.hf_config, lora_targets_resolved=list(setup.lora_targets), **extra)
    if setup.method in ("lora", "qlora"):
        params = layout(model).param_target_modules
        # the worker hands peft "all-linear" itself where that is what resolved, so peft's own MoE
        # conversion (router weight, fused experts at rank 2r) runs as it does for users
        # (not where all-linear had to leave out a router peft cannot wrap: Llama 4)
        d.update(lora_all_linear=setup.lora_targets == resolve_targets(model, "all-linear") and not model.arch.router_linear,
                 lora_target_parameters=sorted(params.intersection(setup.lora_targets)))
    return d


