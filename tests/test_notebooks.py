"""The notebooks run top to bottom in a fresh kernel against the sample runs of ``dynamics.samples``,
and are committed without outputs, their first code cell tagged ``parameters`` (papermill's convention).

Each runs as well on runs shaped like the demo's (``grids/demo.toml``: four runs of one setting, one
per method, analysed with ``--k 1``; on the tiny model, 30 steps), which support only some of the
figures: there a notebook shows what the runs support and, for the rest, prints the line the
``figures`` command prints, never an exception.

The kernel is a kernelspec written for this test that starts ``sys.executable`` (the venv running
pytest) with ``MPLBACKEND=Agg``, so a ``python3`` kernelspec elsewhere on the machine cannot
shadow it. Runs in about 50 s on 2 CPU cores, most of it training the sample runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import dynamics
from dynamics.grid import load_grid
from dynamics.run_analysis import analyze_paths
from dynamics.samples import make_sample_runs

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ["explore_run", "compare_runs", "sharpness"]
KERNEL_NAME = "dynamics-test-python"
CELL_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("sample-runs")
    return root, make_sample_runs(root)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> Path:
    """The demo grid's runs at the tiny scale: its methods and knobs, on tiny-llama / tiny."""
    root = tmp_path_factory.mktemp("demo-runs")
    tiny = dict(model="tiny-llama", task="tiny", steps=30, batch_size=4, seq_len=64, n_train=64, n_eval=8,
                eval_every=10, n_eval_generate=0, progress=False)  # bbc's demo scores no generations
    for cfg in load_grid(ROOT / "grids" / "demo.toml").configs(root):
        dynamics.train({**cfg.to_dict(), **tiny, "run_id": cfg.resolved_run_id})
    assert analyze_paths([root], k=1, max_iter=20).shape[0] == 4
    return root


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A data dir whose ``kernels/`` holds a kernelspec for this interpreter, first on JUPYTER_PATH."""
    data_dir = tmp_path_factory.mktemp("jupyter-data")
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dynamics tests", "language": "python", "env": {"MPLBACKEND": "Agg"}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(data_dir))
        yield data_dir


def parameters_cell(notebook):
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


def test_sample_runs_have_every_table_and_rerun_is_a_no_op(sample_runs):
    root, paths = sample_runs
    assert len(paths) == len(set(paths)) >= 8
    methods = set()
    for path in paths:
        assert path.parent == root and (path / "config.json").exists()
        for name in ("metrics", "layers", "eval", "phases", "sharpness", "trace", "density", "generations"):
            assert (path / f"{name}.parquet").exists(), f"{path.name}: no {name}.parquet"
        config = json.loads((path / "config.json").read_text())["config"]
        assert json.loads((path / "summary.json").read_text())["status"] == "completed"
        assert (path / "checkpoints" / f"step_{config['steps']}").is_dir()
        methods.add(config["method"])
    assert methods == {"lora", "lora+mgpo", "full"}

    files_before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert make_sample_runs(root) == paths
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == files_before


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebook_has_no_outputs_and_a_parameters_cell(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    parameters = parameters_cell(notebook)
    assert "parameters" in parameters.metadata.get("tags", [])
    assert parameters.source.splitlines()[0].startswith("RUNS = ")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: a cell has outputs"
            assert "def " not in cell.source and "class " not in cell.source, f"{name}: logic belongs in dynamics"


def execute(name: str, runs_dir: Path):
    """The notebook ``name`` run top to bottom on ``runs_dir``; returns it with its outputs."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    parameters = parameters_cell(notebook)
    parameters.source = "\n".join(f"RUNS = {str(runs_dir)!r}" if line.startswith("RUNS = ") else line
                                  for line in parameters.source.splitlines())
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any cell error
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.output_type == "error"]
    assert not errors
    return notebook


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.output_type == "stream")


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_runs_top_to_bottom(name, sample_runs, kernel_dir):
    root, _ = sample_runs
    notebook = execute(name, root)
    assert "skipped" not in printed(notebook) and "needs" not in printed(notebook), printed(notebook)


# what each notebook cannot draw from the demo's runs (one setting, no trace, density or sharpness
# during training), in the figures command's words, and how many figures it still draws
DEMO_SKIPS = {
    "explore_run": ([], 5),
    "compare_runs": (["loss_vs_rank  skipped: needs LoRA-family runs", "loss_vs_lr    skipped: needs LoRA-family runs",
                      "phase_map     skipped: needs runs of one method at two or more (rank, lr) settings; such runs "
                      "come from grids/rank_sweep.toml"], 2),
    "sharpness": (["sharpness_during_training: needs top Hessian eigenvalues during training; train with "
                   "--sharpness-every", "trace: needs Hessian traces; run `dynamics analyze --trace`",
                   "spectrum      skipped: needs spectral densities", "density: needs spectral densities"], 1),
}


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_on_the_demos_runs_says_what_they_cannot_show(name, demo_runs, kernel_dir, tmp_path):
    notebook = execute(name, demo_runs)
    text = printed(notebook)
    skips, drawn = DEMO_SKIPS[name]
    for line in skips:
        assert line in text, text
    assert "Traceback" not in text and images(notebook) == drawn, (images(notebook), text)
    nbformat.write(notebook, tmp_path / f"{name}.ipynb")
