"""Optimizer state bytes (where they live) and the transient memory of one optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.methods import Trainable
from vramplan.setup import Setup

# bitsandbytes 8-bit optimizers: 1 byte per element per state, one fp32 absmax per block of 256
# (bitsandbytes/optim/optimizer.py Optimizer2State.init_state, blockwise=True), and tensors with
# fewer than 4096 elements keep fp32 states (min_8bit_size=4096). bitsandbytes' 32-bit optimizers
# (paged AdamW, Lion) keep fp32 states whatever the parameter dtype.
BNB_BLOCK = 256
MIN_8BIT = 4096


@dataclass(frozen=True)
class OptimizerSpec:
    """How an optimizer stores its states and what its step allocates."""

    states: int  # full-size states per element (Adam: 2, momentum/Lion: 1, SGD: 0)
    state_bytes: int | None  # bytes per state element; None = the parameter's dtype (torch rule)
    paged: bool = False  # states in CUDA managed memory, outside the PyTorch allocator
    foreach: bool = False  # torch's multi-tensor step: one full-size temporary list
    factored: bool = False  # Adafactor: row+column second moments for matrices


OPTIMIZERS: dict[str, OptimizerSpec] = {
    # torch.optim.AdamW: exp_avg, exp_avg_sq = zeros_like(param) (torch/optim/adam.py _init_group);
    # the default foreach path builds one temporary list the size of the params (_multi_tensor_adam
    # torch._foreach_sqrt(exp_avg_sqs), seen in this repo's traced run of l1b-full-bf16-ckpt).
    "adamw": OptimizerSpec(2, None, foreach=True),
    "adamw-fused": OptimizerSpec(2, None),
    "adamw-8bit": OptimizerSpec(2, 1),
    "paged-adamw": OptimizerSpec(2, 4, paged=True),
    "paged-adamw-8bit": OptimizerSpec(2, 1, paged=True),
    "sgd": OptimizerSpec(0, None),
    "sgd-momentum": OptimizerSpec(1, None, foreach=False),  # momentum_buffer = clone(grad)
    # transformers.optimization.Adafactor (beta1=None): factored second moment for >=2-D tensors
    "adafactor": OptimizerSpec(0, None, factored=True),
    "lion": OptimizerSpec(1, 4),  # bitsandbytes Lion (32-bit state)
    "lion-8bit": OptimizerSpec(1, 1),
}


@dataclass(frozen=True)
class OptimizerBytes:
    in_allocator: int  # persistent states counted by torch.cuda.memory_allocated
    managed: int  # persistent states in CUDA managed memory (paged)
    step_transient: int  # extra bytes alive at the step's peak


def _adam8_bytes(n: int, states: int) -> int:
    return states * (n + 4 * -(-n // BNB_BLOCK))


def galore_state_bytes(tr: Trainable, setup: Setup) -> tuple[int, int]:
    """(states bytes, elements left for the plain optimizer). For each projected 2-D matrix m x n
    GaLore keeps a projector of r x min(m, n) and optimizer moments of the projected gradient,
    r x max(m, n) each (galore_torch/galore_projector.py, proj_type 'std'); all in the param dtype."""
    r = setup.galore_rank
    pb = tr.bytes_per_param
    opt = setup.optimizer
    # When the gradient reaching the projector is fp32 (fp32 params, or transformers' Adafactor,
    # which upcasts 16-bit grads before GaLoreAdafactor projects them), galore_torch 1.0
    # get_orthogonal_matrix returns Vh[:r, :] / U[:, :r] as a view, keeping the whole
    # min(m, n) x min(m, n) fp32 factor alive (traced: probe-q05-galore-adafactor).
    fp32_grad = pb == 4 or opt == "adafactor"
    states = 0
    projected = 0
    for m, n, count in tr.matrices:
        lo, hi = min(m, n), max(m, n)
        proj = lo * lo * 4 if fp32_grad else r * lo * pb
        small = r * hi
        if opt == "adamw":
            st = 2 * small * pb
        elif opt == "adamw-8bit":
            st = _adam8_bytes(small, 2)
        else:  # adafactor on the projected (fp32) gradient: row + column second moments
            st = (r + hi) * 4
        states += count * (proj + st)
        projected += count * m * n
    return states, tr.params - projected


def plain_state_bytes(n: int, tr: Trainable, opt: str, *, matrices: tuple[tuple[int, int, int], ...] = ()) -> int:
    """States of a plain (non-GaLore) optimizer over `n` elements, of which `matrices` are 2-D."""
    spec = OPTIMIZERS[opt]
    if spec.factored:
        # row + column second moments per matrix; vectors keep a full one
        mats = sum((m + k) * c for m, k, c in matrices)
        vec = max(n - sum(m * k * c for m, k, c in matrices), 0)
        return (mats + vec) * tr.bytes_per_param
    per = spec.state_bytes if spec.state_bytes is not None else tr.bytes_per_param
    if per == 1:
        return _adam8_bytes(n, spec.states)
    return spec.states * n * per


def optimizer_bytes(*, tr: Trainable, setup: Setup) -> OptimizerBytes:
    spec = OPTIMIZERS[setup.optimizer]
    if setup.method == "galore":
        st, rest = galore_state_bytes(tr, setup)
        st += plain_state_bytes(rest, tr, {"adamw-8bit": "adamw-8bit", "adafactor": "adafactor"}.get(setup.optimizer, "adamw-fused"),
                                matrices=tr.other_matrices)
        # GaLore steps one tensor at a time: the largest matrix's full-size update (project_back)
        # and, on projector refresh steps, an fp32 copy for the SVD (galore_projector.py).
        big = max((m * n for m, n, _ in tr.matrices), default=0)
        return OptimizerBytes(st, 0, big * (4 + tr.bytes_per_param))
    st = plain_state_bytes(tr.params, tr, setup.optimizer, matrices=tr.matrices + tr.other_matrices)
    if spec.state_bytes == 1 and setup.trainer in ("hf", "trl") and tr.base_trainable and tr.other_matrices:
        # Trainer registers a 32-bit override for every nn.Embedding weight under bitsandbytes
        # 8-bit optimizers (transformers trainer.py get_optimizer_cls_and_kwargs:
        # manager.register_module_override(module, "weight", {"optim_bits": 32}));
        # measured: tr-l1b-hf-full-8bit-b2s1024
        v, h, _ = tr.other_matrices[0]
        st += spec.states * v * h * 4 - _adam8_bytes(v * h, spec.states)
    if spec.foreach:
        transient = tr.params * tr.bytes_per_param
    elif spec.factored:
        # transformers Adafactor upcasts each 16-bit param and grad to fp32 inside the loop and
        # builds a full-size update: about three fp32 copies of the largest tensor
        transient = 3 * 4 * tr.largest
    else:
        transient = 0
    if spec.paged:
        return OptimizerBytes(0, st, transient)
    return OptimizerBytes(st, 0, transient)
