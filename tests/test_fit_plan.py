from __future__ import annotations

from dataclasses import replace

import pytest

import vramplan
from vramplan.allocator import device_total_on
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.decide.plan import plan, search_space
from vramplan.errors import VramplanError
from vramplan.estimator import estimate_setup
from vramplan.setup import make_setup


def test_fit_verdicts_follow_device_total():
    res = vramplan.fit("llama-3.1-70b", "qlora", grad_checkpointing=True, gpus=["RTX-4090", "H100", "H200"])
    verdicts = {r.gpu.name: r.verdict for r in res.rows}
    assert verdicts["RTX-4090"] == "does not fit"
    assert verdicts["H200"] == "fits"
    from vramplan.allocator import device_total_on

    for r in res.rows:  # the card's own CUDA context and cuBLAS workspaces (the RTX-4090's are smaller)
        assert r.needed_bytes == device_total_on(res.estimate, r.gpu)
        assert (r.headroom_bytes >= 0) == (r.verdict != "does not fit")


def test_fit_rejects_unknown_gpu_with_suggestion():
    with pytest.raises(VramplanError, match="did you mean"):
        vramplan.fit("8b", "lora", gpus=["RTX-4900"])


def test_planned_setups_fit_and_one_step_larger_does_not():
    spec = resolve_model("llama-3.1-8b")
    gpu = resolve_gpu("RTX-4090")
    req = make_setup(spec, method="qlora", seq_len=2048)
    p = plan(spec, req, gpu, keep_method=True)
    assert p.candidates
    cap = gpu.usable_bytes * 0.9
    for c in p.candidates:
        assert device_total_on(estimate_setup(spec, c.setup), gpu) <= cap
    for c in p.candidates:  # one more sequence per micro-batch does not fit
        bigger = replace(c.setup, batch_size=c.setup.batch_size + 1)
        assert device_total_on(estimate_setup(spec, bigger), gpu) > cap


def test_maximize_seq_len_finds_the_longest_sequence_that_fits():
    spec = resolve_model("llama-3.2-1b")
    gpu = resolve_gpu("RTX-4090")
    req = make_setup(spec, method="lora", batch_size=1)
    p = plan(spec, req, gpu, maximize="seq-len", keep_method=True)
    best = p.candidates[0]
    assert best.setup.batch_size == 1 and best.setup.seq_len % 64 == 0
    assert device_total_on(estimate_setup(spec, best.setup), gpu) <= gpu.usable_bytes * 0.9
    for c in p.candidates:  # on the card: its own CUDA context and cuBLAS workspaces
        assert device_total_on(estimate_setup(spec, replace(c.setup, seq_len=c.setup.seq_len + 64)), gpu) > gpu.usable_bytes * 0.9


def test_search_is_exhaustive_over_its_stated_space():
    spec = resolve_model("llama-3.2-1b")
    req = make_setup(spec, method="lora")
    space = search_space(spec, req, methods=None, keep_method=False)
    # full: 2 precisions x 5 optimizers; lora: 2 dtypes x 3 optimizers x 3 ranks; qlora: 2 dtypes x
    # 3 optimizers x 3 ranks; galore: 2 optimizers; each with and without checkpointing
    assert len(space) == (10 + 18 + 18 + 2) * 2
    assert len(set(space)) == len(space)


def test_plan_is_fast_enough_for_thousands_of_setups():
    import time

    t = time.perf_counter()
    # long_context: search lengths past max_position_embeddings too (up to 2**20), the largest space
    p = vramplan.plan("llama-3.1-8b", "A100-40GB", maximize="seq-len", batch_size=1, long_context=True)
    assert p.searched >= 1000
    assert time.perf_counter() - t < 5  # generous for CI; the benchmark reports the real figure


def test_cheapest_finds_the_fewest_cards_and_ranks_by_price():
    from vramplan.decide.fit import cheapest

    spec = resolve_model("70b")
    s = make_setup(spec, method="full", grad_checkpointing=True, optimizer="adamw-fused")
    opts = cheapest(spec, s, gpus=["A100-SXM-80GB", "H100", "H200"])
    assert opts and all(o.count > 8 for o in opts)  # 1.27 TB of model states
    assert [o.cost_hour_usd for o in opts] == sorted(o.cost_hour_usd for o in opts)
    for o in opts:
        assert o.engine.startswith("ZeRO")
        assert o.per_gpu_bytes <= o.gpu.usable_bytes * 0.9
    q = cheapest(spec, make_setup(spec, method="qlora", grad_checkpointing=True), gpus=["H100", "RTX-4090"])
    assert q[0].count == 1
