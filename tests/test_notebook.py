"""examples/quickstart.ipynb runs top to bottom (nbclient, a kernel of this interpreter) on the
embedded model, and shows what it says it shows."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.mark.real
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # a kernel of this very interpreter (the venv), whatever kernels the machine has installed
    spec_dir = tmp_path / "kernels" / "steering-lab-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "steering lab test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert "steering-lab-test" in KernelSpecManager().find_kernel_specs()
    client = NotebookClient(nb, kernel_name="steering-lab-test", timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_text(c) for c in code]
    assert "SmolLM2-135M-Instruct" in texts[0]
    assert "recommended layer" in texts[1]
    plots = [c for c in code if any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in c.outputs)]
    assert len(plots) == 2  # the layer scan and the sweep chart
    assert texts[3].count("[unsteered]") == 1 and "[+" in texts[3] and "[-" in texts[3]
    assert "KL 0.000" in texts[5]  # strength 0 is the unsteered model
    assert "held-out AUROC" in texts[6]
    assert "sentiment.gguf" in texts[7] and texts[7].strip().endswith("0.0")  # GGUF round trip exact
