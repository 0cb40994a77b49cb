from __future__ import annotations

import pytest

from vramplan.catalog import gpu_catalog, resolve_gpu
from vramplan.errors import VramplanError
from vramplan.units import MiB


def test_catalogue_has_25_gpus_with_sources():
    cards = gpu_catalog()
    assert len(cards) >= 25
    assert all(g.source and g.memory_bytes > 0 and g.bandwidth_gbs > 0 for g in cards.values())


def test_h100_memory_is_what_the_driver_reports():
    h100 = resolve_gpu("h100")
    assert h100.memory_bytes == 81559 * MiB
    assert h100.usable_bytes == 85017493504 // MiB * MiB  # cudaMemGetInfo total in the reference records


@pytest.mark.parametrize("alias", ["4090", "rtx4090", "RTX 4090", "geforce-rtx-4090"])
def test_gpu_aliases(alias):
    assert resolve_gpu(alias).name == "RTX-4090"


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(VramplanError, match="unknown GPU 'H10'.*did you mean"):
        resolve_gpu("H10")
