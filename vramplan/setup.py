"""A training setup: what is trained, how, on what shapes. Validated on construction; the same
object drives the estimator and (through to_dict) the profiler."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vramplan.arch import ModelSpec
from vramplan.errors import VramplanError, unknown
from vramplan.layout import layout

METHODS = ("full", "lora", "qlora", "galore", "prefix", "prompt", "ia3", "bitfit")
DTYPES = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")
QUANTISED = ("int8", "nf4", "fp4")
PRECISIONS = ("pure", "mixed", "fp32")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-momentum",
              "adafactor", "lion", "lion-8bit")
GALORE_OPTIMIZERS = ("adamw", "adamw-8bit", "adafactor")
ATTNS = ("sdpa", "flash", "eager")
# Methods that train adapters on a frozen base, and so go with a quantised base.
ADAPTER_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")


@dataclass(frozen=True)
class Setup:
    method: str = "full"
    dtype: str = "bf16"
    precision: str = "pure"
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool = False
    attn: str = "sdpa"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()
    galore_rank: int = 128
    prefix_tokens: int = 20
    prefix_projection: bool = False
    double_quant: bool = True
    kbit_prepare: bool = True
    grad_accum: int = 1
    hold_outputs: bool = True

    @property
    def quantised(self) -> bool:
        return self.dtype in QUANTISED

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def _posint(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise VramplanError(f"{name} must be a positive integer, got {value!r}")
    return value


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise unknown(name, value, allowed)
    return value


def resolve_targets(model: ModelSpec, targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target modules: 'all-linear' (every Linear in the decoder layers, as peft does),
    'attention', or names as in the HF model ('q_proj,v_proj')."""
    lay = layout(model)
    available = {lm.module for lm in lay.linears}
    if not available:
        raise VramplanError(f"model {model.name!r} has no Linear modules LoRA can target")
    if isinstance(targets, str):
        if targets in ("all-linear", "all"):
            return tuple(sorted(available))
        if targets in ("attention", "attn"):
            return tuple(sorted({lm.module for lm in lay.linears if lm.kind == "attn"}))
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        if t not in available:
            raise unknown("LoRA target module", t, [*sorted(available), "all-linear", "attention"])
        out.append(t)
    if not out:
        raise VramplanError("lora_targets is empty; allowed: all-linear, attention, or module names")
    return tuple(dict.fromkeys(out))


def make_setup(model: ModelSpec, *, method: str = "full", dtype: str | None = None, precision: str = "pure",
               optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 2048, grad_checkpointing: bool = False,
               attn: str = "sdpa", lora_rank: int = 16, lora_alpha: float | None = None, lora_dropout: float = 0.05,
               lora_targets: str | list[str] | tuple[str, ...] = "all-linear", galore_rank: int = 128,
               prefix_tokens: int = 20, prefix_projection: bool = False, double_quant: bool = True,
               kbit_prepare: bool = True, grad_accum: int = 1, hold_outputs: bool = True) -> Setup:
    """Validate user options against the model and return the resolved Setup."""
    _choice("method", method, METHODS)
    _choice("precision", precision, PRECISIONS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    _choice("attention implementation", attn, ATTNS)
    _posint("batch_size", batch_size)
    _posint("seq_len", seq_len)
    _posint("grad_accum", grad_accum)
    if dtype is None:
        dtype = "nf4" if method == "qlora" else ("fp32" if precision == "fp32" else "bf16")
    _choice("dtype", dtype, DTYPES)
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
    if model.arch.family == "gpt2" and seq_len > model.arch.max_positions:
        raise VramplanError(f"seq_len {seq_len} exceeds {model.name}'s learned positions ({model.arch.max_positions})")
    if method == "bitfit" and not layout(model).layer_biases:
        raise VramplanError(f"method bitfit trains bias terms, and {model.name} has none")
    targets: tuple[str, ...] = ()
    if method in ("lora", "qlora"):
        _posint("lora_rank", lora_rank)
        targets = resolve_targets(model, lora_targets)
        limit = min(min(lm.d_in, lm.d_out) for lm in layout(model).linears if lm.module in targets)
        if lora_rank > limit:
            raise VramplanError(f"lora_rank {lora_rank} exceeds the smallest target matrix dimension ({limit}); allowed: 1..{limit}")
        if not 0.0 <= lora_dropout < 1.0:
            raise VramplanError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
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
    return Setup(
        method=method, dtype=dtype, precision=precision, optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
        grad_checkpointing=grad_checkpointing, attn=attn, lora_rank=lora_rank,
        lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank), lora_dropout=lora_dropout,
        lora_targets=targets, galore_rank=galore_rank, prefix_tokens=prefix_tokens,
        prefix_projection=prefix_projection, double_quant=double_quant, kbit_prepare=kbit_prepare, grad_accum=grad_accum,
        hold_outputs=hold_outputs,
    )


def profiler_setup(model: ModelSpec, setup: Setup, **extra: Any) -> dict[str, Any]:
    """The JSON the profiler worker takes: the setup plus the model's HF config."""
    d = setup.to_dict()
    d.update(model=model.name, hf_config=model.arch.hf_config, lora_targets_resolved=list(setup.lora_targets), **extra)
    return d


