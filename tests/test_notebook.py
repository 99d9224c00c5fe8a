"""docs/notebooks/quickstart.ipynb runs top to bottom (nbclient), offline: ``REGIONCLIP_QUICKSTART_WEIGHTS`` points
it at tiny random weights in the released checkpoint layout instead of the RN50x4 download."""
from __future__ import annotations

from pathlib import Path

import pytest

from _region_helpers import write_tiny_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny_official_layout.pth", rpn=True)
    monkeypatch.setenv("REGIONCLIP_QUICKSTART_WEIGHTS", str(ckpt))
    monkeypatch.setenv("REGIONCLIP_HOME", str(tmp_path / "home"))  # nothing from a user's cache, nothing downloaded
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for outs in outputs.values() for o in outs if o.get("output_type") == "stream")
    assert "sample_img1.jpg" in text and "detections; best:" in text and "box 0 ->" in text
    # the visualisation cells return images (rich display), not errors
    assert any("image/png" in o.get("data", {}) for outs in outputs.values() for o in outs)
