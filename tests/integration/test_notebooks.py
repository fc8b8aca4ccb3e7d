"""The notebooks under notebooks/ run top to bottom in a Jupyter kernel on CPU and render their figures.

Each test executes an in-memory copy of a committed notebook with nbclient, in a kernel started from
the repository root and running this interpreter; the notebooks write their figures (and the
quickstart its CSV logs) to ``$LIT_IMPALA_NOTEBOOK_OUT``, pointed at the test's tmp_path.
"""

import csv
import sys

import pytest

nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs nbclient (pip install -e '.[dev]')")
import nbformat  # noqa: E402  (installed with nbclient)

from tests.conftest import REPO  # noqa: E402

NOTEBOOKS = REPO / "notebooks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    """Where the notebooks write; also pins the ``python3`` kernel to this interpreter.

    jupyter_client would take the first ``python3`` kernelspec on its path (a user-level one may
    name another Python); a spec written by ipykernel into ``$JUPYTER_PATH``, searched first,
    runs ``sys.executable``. The kernel inherits this process's environment.
    """
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
    out = tmp_path / "out"
    monkeypatch.setenv("LIT_IMPALA_NOTEBOOK_OUT", str(out))
    return out


def execute(name: str) -> nbformat.NotebookNode:
    """Run notebooks/<name> in a fresh kernel whose working directory is the repository root."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, at the first failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    return notebook


def assert_figure(notebook: nbformat.NotebookNode, png) -> None:
    assert png.is_file(), f"{png.name} was not saved"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{png.name} is not a PNG"
    assert len(data) > 10_000, f"{png.name} is only {len(data)} bytes: an empty figure?"
    rendered = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                if "image/png" in output.get("data", {})]
    assert rendered, "the figure was not displayed in the notebook"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_vtrace.ipynb"])
def test_committed_notebooks_carry_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs before committing"


@pytest.mark.slow
def test_quickstart_trains_cartpole_and_plots(output_dir):
    notebook = execute("01_quickstart.ipynb")
    assert_figure(notebook, output_dir / "quickstart.png")
    (metrics_csv,) = output_dir.glob("quickstart/version_*/metrics.csv")
    with open(metrics_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    returns = [float(row["episode/return"]) for row in rows if row.get("episode/return")]
    assert len(returns) >= 5, f"too few logged returns: {returns}"
    assert any(row.get("progress/frames_per_second") for row in rows)
    assert returns[-1] > 50, f"final mean return {returns[-1]:.1f}: no better than random (~22)"


def test_vtrace_walkthrough_runs_and_plots(output_dir):
    notebook = execute("02_vtrace.ipynb")
    assert_figure(notebook, output_dir / "vtrace.png")
