"""The adapter branch of a LoRA/DoRA-targeted Linear (peft 0.21 tuners/lora/layer.py
Linear.forward, tuners/lora/dora.py DoraLinearLayer.forward): what it saves of its input, DoRA's
extra outputs and weight casts, and the transients of the cast and dropout."""

from __future__ import annotations

from vramplan.layout import LinearModule
from vramplan.methods import adapter_bytes
from vramplan.ops.tensors import FIXED, FORWARD, OpContext, Saved, sized, tok


def adapter_input(c: OpContext, mod: str, d_in: int, in_bytes: int) -> tuple[tuple[Saved, ...], bool]:
    """What the adapter of `mod` saves of its input, and whether lora_A saves the fp32 input
    itself (one tensor shared by every target reading it; the caller counts it once).

    peft casts x to the adapter dtype (fp32), then dropout saves a bool mask and an fp32 output for
    lora_A. Under autocast lora_A (an fp32 Linear) saves its own 16-bit cast of the dropout output
    and dropout keeps only its mask (traced: probe-l1b-lora-mixed)."""
    if mod not in c.lora:
        return (), False
    drop = c.setup.lora_dropout > 0
    mask = (tok(c, f"{mod}.lora_dropout.mask", 1, d_in),) if drop else ()
    if adapter_bytes(c.setup) == 2:
        # 16-bit adapters (a 4-bit base peft did not prepare): the cast to the adapter dtype is a
        # no-op; dropout's 16-bit output is what lora_A saves (traced: t4-q15-trl-qlora-b4s1024,
        # per target a 1-byte mask and a 16-bit copy of its input at the peak, nothing fp32)
        return ((*mask, tok(c, f"{mod}.lora_dropout.output", 2, d_in)) if drop else ()), False
    if c.dt.autocast or c.dt.lora_autocast:
        return (*mask, tok(c, f"{mod}.lora_A.input_cast", 2, d_in)), False
    if drop:
        return (*mask, tok(c, f"{mod}.lora_dropout.output", 4, d_in)), False
    if in_bytes != 4:
        return (tok(c, f"{mod}.lora_A.input_fp32", 4, d_in),), False
    return (), True


def dora(c: OpContext) -> tuple[Saved, ...]:
    """DoRA (with dropout in training): per targeted module `base_result = F.linear(x,
    weight.to(x.dtype))` recomputes the base output and `(mag_norm_scale - 1) * base_result +
    mag_norm_scale * lora_result * scaling` saves both outputs for the magnitude's gradient; F.linear
    saves its weight operand for the input gradient: the base weight cast to the compute dtype, a
    dense d_out x d_in copy per module (per layer, not per token). Forward transient of the largest
    module: the fp32 weight copy, weight + scaling * lora_weight and the d_out x d_in lora_weight
    built from an identity. Traced: tr-l1b-hf-dora-b2s1024 (dora.py:163, 5 x 32 MiB per layer)."""
    if not (c.lora and c.setup.use_dora):
        return ()
    dt = c.dt
    ob = 2 if (dt.autocast or dt.lora_autocast or dt.linear_out == 2) else 4
    wb = 2 if (dt.autocast or dt.lora_autocast) else 4
    mods = [lm for lm in c.linears if lm.module in c.setup.lora_targets]
    out: list[Saved] = []
    for lm in mods:
        out += (tok(c, f"{lm.module}.dora.base_result", ob, lm.d_out), tok(c, f"{lm.module}.dora.lora_result", ob, lm.d_out),
                sized(c, f"{lm.module}.dora.weight_cast", FIXED, wb, lm.numel))
    if mods:
        out += dora_forward_transient(c, mods)
    return tuple(out)


def dora_forward_transient(c: OpContext, mods: list[LinearModule]) -> tuple[Saved, ...]:
    """The largest module's forward transients (DoraLinearLayer.forward and get_lora_weight, peft
    0.21 tuners/lora/dora.py), alive together until the module's forward returns: the identity
    `x_eye = torch.eye(d_in)` in the adapter dtype (lora_A saves it for its weight gradient, and
    the graph lives as long as lora_weight does), its 16-bit cast when lora_A runs under autocast,
    lora_weight (d_in x d_out), the base weight in the input's dtype when it has to be made
    (a 4-bit base is dequantised; a 16-bit one copied to fp32 inputs), `scaling * lora_weight`
    and their sum."""
    ab = adapter_bytes(c.setup)
    auto = c.dt.autocast or c.dt.lora_autocast
    lb = 2 if auto else ab
    # the input's dtype: peft casts it to the adapter dtype only outside autocast
    xb = c.dt.linear_out if auto else max(ab, c.dt.linear_out)
    quantised = c.setup.quantised

    def total(lm: LinearModule) -> tuple[Saved, ...]:
        sq = lm.d_in * lm.d_in
        parts = [sized(c, f"{lm.module}.dora.x_eye", FIXED, ab, sq, FORWARD)]
        if auto and ab == 4:
            parts.append(sized(c, f"{lm.module}.dora.x_eye_cast", FIXED, 2, sq, FORWARD))
        parts += [sized(c, f"{lm.module}.dora.lora_weight", FIXED, lb, lm.numel, FORWARD),
                  sized(c, f"{lm.module}.dora.scaled_lora_weight", FIXED, lb, lm.numel, FORWARD),
                  sized(c, f"{lm.module}.dora.weight_plus_lora", FIXED, max(lb, xb), lm.numel, FORWARD)]
        if quantised:  # dequantize_module_weight: a 16-bit copy, then .to(x.dtype)
            parts.append(sized(c, f"{lm.module}.dora.weight_dequantised", FIXED, 2, lm.numel, FORWARD))
        if xb == 4:
            parts.append(sized(c, f"{lm.module}.dora.weight_in_input_dtype", FIXED, 4, lm.numel, FORWARD))
        return tuple(parts)

    return max((total(lm) for lm in mods), key=lambda ts: sum(t.coef for t in ts))


def lora_input_cast(c: OpContext) -> tuple[Saved, ...]:
    """Forward transient of the widest targeted input under autocast with dropout: peft's cast of
    the input to the fp32 adapter dtype and dropout's new fp32 tensor exist while lora_A runs,
    beside lora_A's 16-bit cast (traced: tr-l1b-trl-lora-b2s1024, _cast_input_dtype + dropout,
    64 MiB each on down_proj)."""
    if c.setup.method not in ("lora", "qlora") or c.setup.lora_dropout == 0 or not (c.dt.lora_autocast or c.dt.autocast):
        return ()
    if adapter_bytes(c.setup) == 2:  # 16-bit adapters: no fp32 cast of the input
        return ()
    widest = max((lm.d_in for lm in c.linears if lm.module in c.setup.lora_targets), default=0)
    return (tok(c, "lora.input_fp32", 4, widest, FORWARD), tok(c, "lora_dropout.output", 4, widest, FORWARD),
            tok(c, "lora_A.input_cast", 2, widest, FORWARD))
