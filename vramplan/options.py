"""The one table of training-setup options.

Every option of a setup is one `Option` row below. From this table come: the fields of
`vramplan.setup.Setup` (and so the JSON `setup`), the type/choice checks of `make_setup`, the
keyword arguments of `estimate`, `estimate_parallel`, `fit` and `plan`, and the CLI flags shared
by `estimate`, `fit`, `plan` and `profile` (vramplan/cli/options.py).

A value is resolved in this order: what the user passed > the trainer preset > the default.
Presets and defaults may be functions of the options resolved before them (table order), e.g.
QLoRA's dtype default is nf4. Adding an option: append a row (after the options its default
reads), then read `setup.<name>` where it is modelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, make_dataclass
from functools import cached_property
from typing import Any

from vramplan.errors import VramplanError, unknown

TRAINERS = ("hf", "trl", "plain")
METHODS = ("full", "lora", "qlora", "galore", "prefix", "prompt", "ia3", "bitfit")
DTYPES = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")
QUANTISED = ("int8", "nf4", "fp4")
PRECISIONS = ("pure", "mixed", "fp32")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-momentum",
              "adafactor", "lion", "lion-8bit")
GALORE_OPTIMIZERS = ("adamw", "adamw-8bit", "adafactor")
ATTNS = ("sdpa", "flash", "eager")

Resolved = Mapping[str, Any]
Value = Any  # a constant, or a function of the options resolved so far (table order)


class _Unset:
    """An option the user did not pass: the trainer preset or the default fills it."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Option:
    """One setup option: its Setup field, its API keyword, its CLI flag, its presets."""

    name: str  # Setup field and keyword argument
    type: type  # int, float, bool or str (the stored type; lora_targets is stored as a tuple)
    default: Value  # used when neither the user nor the trainer preset sets it
    help: str
    choices: tuple[str, ...] = ()
    flag: str = ""  # CLI long flag; "" -> --name-with-dashes (bools also get --no-...)
    short: str = ""  # CLI short flag, e.g. "-b"
    presets: tuple[tuple[str, Value], ...] = ()  # (trainer, value) pairs overriding the default
    minimum: float | None = None  # numbers: smallest allowed value
    below: float | None = None  # numbers: values must be < this
    none_ok: bool = False  # None is a value the user may pass (means "derive it")
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)  # e.g. stored type

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @cached_property
    def _preset_map(self) -> dict[str, Value]:
        return dict(self.presets)

    def preset(self, trainer: str) -> Value:
        """The value `trainer` gives this option (a constant or a function), or UNSET."""
        return self._preset_map.get(trainer, UNSET)


def _hf_ckpt(o: Resolved) -> bool:
    """on for a kbit-prepared quantised base"""
    # peft prepare_model_for_kbit_training(use_gradient_checkpointing=True) is the default the
    # QLoRA recipes call (peft/utils/other.py); prefix tuning cannot checkpoint (peft refuses).
    return o["dtype"] in QUANTISED and o["kbit_prepare"] and o["method"] != "prefix"


def _trl_ckpt(o: Resolved) -> bool:
    """on (not for prefix tuning)"""
    # TRL 1.x SFTConfig.gradient_checkpointing defaults to True (trl/trainer/sft_config.py).
    return o["method"] != "prefix"


def _hf_optimizer(o: Resolved) -> str:
    """adamw-fused (galore: adamw)"""
    # transformers 5 TrainingArguments.optim defaults to adamw_torch_fused on torch >= 2.8
    # (training_args.py); GaLore is chosen by optim="galore_adamw", which is not fused.
    return "adamw" if o["method"] == "galore" else "adamw-fused"


def _default_dtype(o: Resolved) -> str:
    """nf4 for qlora, fp32 for precision fp32, else bf16"""
    return "nf4" if o["method"] == "qlora" else ("fp32" if o["precision"] == "fp32" else "bf16")


def _default_alpha(o: Resolved) -> float:
    """2 x lora_rank"""
    return float(2 * o["lora_rank"])


OPTIONS: tuple[Option, ...] = (
    Option("trainer", str, "hf", "training loop whose defaults apply: hf (transformers Trainer), trl (SFTTrainer), "
           "plain (the reference loop of the measurements)", TRAINERS),
    Option("method", str, "full", "fine-tuning method", METHODS),
    Option("precision", str, "pure", "mixed: fp32 master weights + autocast", PRECISIONS),
    Option("dtype", str, _default_dtype, "base weights", DTYPES, none_ok=True),
    Option("optimizer", str, "adamw", "optimizer", OPTIMIZERS,
           presets=(("hf", _hf_optimizer), ("trl", _hf_optimizer))),
    Option("batch_size", int, 1, "micro-batch size", short="-b", minimum=1),
    Option("seq_len", int, 2048, "sequence length in tokens", short="-s",
           minimum=1, presets=(("trl", 1024),)),
    Option("grad_accum", int, 1, "gradient accumulation steps", minimum=1),
    Option("attn", str, "sdpa", "attention implementation (flash: FlashAttention-2)", ATTNS),
    Option("lora_rank", int, 16, "LoRA rank", minimum=1),
    Option("lora_alpha", float, _default_alpha, "LoRA alpha (default 2*rank)", none_ok=True),
    Option("lora_dropout", float, 0.05, "LoRA dropout", minimum=0.0, below=1.0),
    Option("lora_targets", str, "all-linear", "LoRA targets: all-linear, attention, or module names: q_proj,v_proj",
           extra={"stored": tuple}),
    Option("use_dora", bool, False, "DoRA: weight-decomposed LoRA (peft use_dora)", flag="--dora"),
    Option("galore_rank", int, 128, "GaLore rank", minimum=1),
    Option("prefix_tokens", int, 20, "virtual tokens (prefix / prompt tuning)", minimum=1),
    Option("prefix_projection", bool, False, "prefix tuning with a reparametrising MLP"),
    Option("double_quant", bool, True, "4-bit double quantisation"),
    # bitsandbytes packs two 4-bit values a byte whatever the storage dtype (the same bytes), but
    # only a floating one lets FSDP2 and ZeRO-3 shard the weights (vramplan.distributed
    # unsharded_quantised_bytes); BitsAndBytesConfig's default is uint8, axolotl and LlamaFactory
    # pass the compute dtype (bf16) for every 4-bit load
    Option("quant_storage", str, "uint8", "storage dtype of 4-bit weights (bnb_4bit_quant_storage); a float one "
           "lets FSDP2/ZeRO-3 shard them", choices=("uint8", "bf16", "fp16", "fp32")),
    # TRL 1.16's SFTTrainer builds the PEFT model with get_peft_model alone (trl/trainer/sft_trainer.py);
    # only the experimental ORPO/CPO trainers call prepare_model_for_kbit_training, so a TRL QLoRA
    # run keeps its non-quantised weights in the loaded 16-bit dtype (t12-*-trl-qlora: +41-57% with
    # the upcast assumed).
    Option("kbit_prepare", bool, True, "peft prepare_model_for_kbit_training (fp32 upcast of non-quantised weights)",
           presets=(("trl", False),)),
    Option("grad_checkpointing", bool, False, "non-reentrant activation checkpointing", presets=(("hf", _hf_ckpt), ("trl", _trl_ckpt))),
    Option("checkpoint_offload", bool, False, "offload checkpointed layer inputs to host memory (needs checkpointing)"),
    Option("activation_offload", bool, False, "offload saved activations to host memory"),
    Option("liger", bool, False, "Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)"),
    Option("hold_outputs", bool, True, "the loop keeps the model output (logits) through backward and step "
           "(hf/trl: compute_loss keeps only the loss)", presets=(("hf", False), ("trl", False))),
    Option("long_context", bool, False, "allow seq_len beyond the model's max_position_embeddings (rope scaling)"),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def _field_type(o: Option) -> Any:
    return tuple[str, ...] if o.extra.get("stored") is tuple else o.type


# The fields of Setup, generated from the table (Setup itself lives in vramplan.setup).
SetupFields = make_dataclass("SetupFields", [(o.name, _field_type(o)) for o in OPTIONS], frozen=True)


def _check_type(o: Option, value: Any) -> Any:
    """The value as its option's type, or a one-line error naming it and what is allowed."""
    if o.type is bool:
        if not isinstance(value, bool):
            raise VramplanError(f"{o.name} must be true or false, got {value!r}")
        return value
    if o.type is int:
        if isinstance(value, bool) or not isinstance(value, int) or (o.minimum is not None and value < o.minimum):
            raise VramplanError(f"{o.name} must be a positive integer, got {value!r}")
        return value
    if o.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise VramplanError(f"{o.name} must be a number, got {value!r}")
        if (o.minimum is not None and value < o.minimum) or (o.below is not None and value >= o.below):
            raise VramplanError(f"{o.name} must be in [{o.minimum:g}, {o.below:g}), got {value!r}")
        return float(value)
    if o.extra.get("stored") is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if not isinstance(value, str):
        raise VramplanError(f"{o.name} must be a string, got {value!r}")
    if o.choices and value not in o.choices:
        what = {"attn": "attention implementation"}.get(o.name, o.name)
        raise unknown(what, value, o.choices)
    return value


def check_names(names: Iterable[str], *, allowed_extra: Iterable[str] = ()) -> None:
    """Refuse keyword arguments that are not options (a typo must not pass silently)."""
    known = set(NAMES) | set(allowed_extra)
    for n in names:
        if n not in known:
            raise unknown("option", n, sorted(known))


def resolve(user: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's value: the user's (UNSET or absent = not given), else the trainer preset,
    else the default; constants and functions of earlier options alike. Type-checked."""
    check_names(user)
    out: dict[str, Any] = {}
    for o in OPTIONS:
        v = user.get(o.name, UNSET)
        if v is None and o.none_ok:
            v = UNSET
        if v is UNSET:
            v = o.preset(out["trainer"]) if o.name != "trainer" else UNSET
            if v is UNSET:
                v = o.default
            if callable(v):
                v = v(out)
        out[o.name] = _check_type(o, v)
    return out


def trainer_preset(trainer: str, **given: Any) -> dict[str, Any]:
    """What `trainer` sets for each option it changes, given the other options (for display)."""
    if trainer not in TRAINERS:
        raise unknown("trainer", trainer, TRAINERS)
    base = resolve({**given, "trainer": "plain"})
    mine = resolve({**given, "trainer": trainer})
    return {k: v for k, v in mine.items() if k != "trainer" and v != base[k] and k not in given}
