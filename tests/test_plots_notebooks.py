from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.errors import VramplanError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_figures_render_to_png_and_svg(tmp_path):
    from vramplan.plots import breakdown_figure, sweep_figure, validation_figure

    figs = {
        "b.png": breakdown_figure("llama-3.2-1b", [{"method": "full"}, {"method": "lora"}, {"method": "qlora"}]),
        "s.svg": sweep_figure("seq-len", model="llama-3.2-1b", methods=["lora", "qlora"], values=[512, 1024, 2048]),
        "m.png": sweep_figure("model-size", methods=["qlora"], values=["qwen2.5-0.5b", "llama-3.1-8b", "llama-3.1-70b"],
                              grad_checkpointing=True),
        "v.png": validation_figure(),
    }
    for name, fig in figs.items():
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
        assert fig.axes[0].get_ylabel()


def test_unknown_sweep_is_an_error():
    from vramplan.plots import sweep_figure

    with pytest.raises(VramplanError, match="unknown sweep"):
        sweep_figure("temperature")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_execute(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without stale outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
