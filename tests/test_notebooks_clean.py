"""The committed notebooks: thin, parameterised, and without outputs except where nbval compares them.

Fix a failure with ``python -m clip_refine_lab.ui.notebook strip notebooks/*.ipynb`` (keeps the outputs of
``# NBVAL_CHECK_OUTPUT`` cells; refresh those by executing the notebook on the micro preset first).
"""

import ast
import json
from pathlib import Path

import nbformat
import pytest

from clip_refine_lab.ui.notebook import CHECK_OUTPUT_MARK, strip_outputs
from clip_refine_lab.ui.parameters import NOTEBOOK_PARAMETERS

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))  # every notebook: valid, no stray outputs, literal parameters
TOUR = [NOTEBOOKS / f"{stem}.ipynb" for stem in NOTEBOOK_PARAMETERS]  # checked by clip_refine_lab.ui.parameters
HINT = "run `python -m clip_refine_lab.ui.notebook strip notebooks/*.ipynb` before committing"


def test_the_tour_notebooks_are_there():
    missing = [p.name for p in TOUR if not p.is_file()]
    assert not missing, f"missing notebooks: {missing}"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_valid_notebook_with_python_kernel(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_no_outputs_except_checked_cells(path):
    nb = load(path)
    for i, cell in enumerate(code_cells(nb)):
        where = f"{path.name}, code cell {i}"
        outputs = cell.get("outputs", [])
        if CHECK_OUTPUT_MARK in source(cell):
            assert outputs, f"{where} is marked {CHECK_OUTPUT_MARK} but has no stored output for nbval to compare"
            assert isinstance(cell.get("execution_count"), int), f"{where}: nbval needs an execution count here"
            for out in outputs:
                assert out["output_type"] == "stream" and out.get("name") == "stdout", (
                    f"{where}: a checked cell may only keep printed text, found {out['output_type']}")
        else:
            assert outputs == [], f"{where} has outputs: {HINT}"
            assert cell.get("execution_count") is None, f"{where} has an execution count: {HINT}"
        for key in ("execution", "papermill", "ExecuteTime"):
            assert key not in cell.get("metadata", {}), f"{where} carries run metadata '{key}': {HINT}"
    assert "widgets" not in nb["metadata"], f"{path.name} stores widget state: {HINT}"
    assert "papermill" not in nb["metadata"], f"{path.name} is a papermill output, not a source notebook"
    assert strip_outputs(load(path)) == nb


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_parameters_cell_is_plain_literals(path):
    nb = load(path)
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters' (papermill)"
    cell = tagged[0]
    assert cell["cell_type"] == "code" and code_cells(nb)[0] is cell, "the parameters cell is the first code cell"
    names = []
    for node in ast.parse(source(cell)).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{path.name}: the parameters cell may only hold `name = literal` lines")
        ast.literal_eval(node.value)  # raises on anything but a plain literal
        names.append(node.targets[0].id)
    if path.stem in NOTEBOOK_PARAMETERS:
        assert names == list(NOTEBOOK_PARAMETERS[path.stem]), (
            f"{path.name}: parameters cell and clip_refine_lab.ui.parameters.NOTEBOOK_PARAMETERS disagree")


@pytest.mark.parametrize("path", TOUR, ids=lambda p: p.stem)
def test_parameters_are_checked_right_after(path):
    cells = code_cells(load(path))
    assert f'check_parameters(globals(), "{path.stem}")' in source(cells[1]), (
        f"{path.name}: the cell after the parameters must call check_parameters(globals(), \"{path.stem}\")")


@pytest.mark.parametrize("path", TOUR, ids=lambda p: p.stem)
def test_notebooks_stay_thin(path):
    for i, cell in enumerate(code_cells(load(path))):
        lines = [line for line in source(cell).splitlines() if line.strip() and not line.strip().startswith("#")]
        assert len(lines) <= 25, f"{path.name}, code cell {i}: {len(lines)} lines; move logic into the library"


@pytest.mark.parametrize("path", TOUR, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(path, caplog):
    """papermill parses the parameters cell line by line (`-p name value`, `--help-notebook`): a comment
    with '=' in it makes it skip the line, so keep comments free of '='."""
    import papermill

    with caplog.at_level("WARNING"):
        params = papermill.inspect_notebook(str(path))
    assert list(params) == list(NOTEBOOK_PARAMETERS[path.stem])
    assert "Unable to parse" not in caplog.text


@pytest.mark.parametrize("path", TOUR, ids=lambda p: p.stem)
def test_notebooks_leave_progress_and_folders_to_the_library(path):
    """Bars come from clip_refine_lab.progress (text under papermill/nbval) and folders from
    clip_refine_lab.rundir (which honours $CLIP_REFINE_LAB_OUTPUT_ROOT), never from a cell."""
    for i, cell in enumerate(code_cells(load(path))):
        text = source(cell)
        for banned in ("tqdm", "Path(", "os.path", "mkdir", "pretrain_base"):
            assert banned not in text, f"{path.name}, code cell {i} uses {banned}: call the library instead"
