"""tools/student.py (`make student`): the class copy has no solution left, runs top to bottom, and the teacher's
notebooks are untouched.

Running every student notebook at the ci profile takes as long as the notebooks' own nbval run; each
notebook is its own test, so `pytest -n 2` spreads them.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "notebooks"
NOTEBOOKS = sorted(p.relative_to(SOURCE) for p in SOURCE.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
IDS = [str(p) for p in NOTEBOOKS]

spec = importlib.util.spec_from_file_location("student", ROOT / "tools" / "student.py")
student = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student)


def digests() -> dict[str, str]:
    return {str(p): hashlib.sha256((SOURCE / p).read_bytes()).hexdigest() for p in NOTEBOOKS}


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The student copy, written by the tool's command line into a temporary folder; checks the sources' hashes."""
    out = tmp_path_factory.mktemp("class") / "student"
    before = digests()
    assert student.main(["--out", str(out)]) == 0
    assert digests() == before, "tools/student.py changed a teacher's notebook"
    return out


def is_solution(cell) -> bool:
    """tests/test_notebooks.py's rule, written out again here so the tool is checked against it."""
    return cell["source"].startswith(("# Solution to exercise", "**Solution to exercise"))


def output_texts(cell) -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            texts.append(output["text"])
        texts += [value for value in output.get("data", {}).values() if isinstance(value, str)]
    return [t for t in texts if t.strip()]


def test_every_notebook_is_copied_and_has_exercises(copy):
    copied = sorted(p.relative_to(copy) for p in copy.rglob("*.ipynb"))
    assert copied == NOTEBOOKS
    assert len(NOTEBOOKS) >= 20


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_no_solution_source_or_output_survives(copy, notebook):
    teacher = nbformat.read(SOURCE / notebook, as_version=4)
    ours = nbformat.read(copy / notebook, as_version=4)
    assert len(ours.cells) == len(teacher.cells)
    solutions = [(t, s) for t, s in zip(teacher.cells, ours.cells, strict=True) if is_solution(t)]
    assert solutions, f"{notebook} has no exercise solutions"
    # lines of the solutions that appear nowhere else in the teacher's notebook
    elsewhere = {line.strip() for cell in teacher.cells if not is_solution(cell) for line in cell.source.splitlines()}
    secret = {line.strip() for t, _ in solutions for line in t.source.splitlines()} - elsewhere - {""}
    shown = {text for cell in teacher.cells if not is_solution(cell) for text in output_texts(cell)}
    secret_outputs = [text for t, _ in solutions for text in output_texts(t) if text not in shown]
    assert secret
    every_line = {line.strip() for cell in ours.cells for line in cell.source.splitlines()}
    assert not secret & {line for line in every_line if not line.endswith("your answer here")}, (
        f"{notebook}: solution lines left in the student copy: {sorted(secret & every_line)[:3]}")
    every_output = "\n".join(text for cell in ours.cells for text in output_texts(cell))
    assert not [text for text in secret_outputs if text in every_output]
    for t, s in solutions:
        number = student.EXERCISE.match(t.source.splitlines()[0]).group(1)
        assert s.cell_type == t.cell_type and s.get("outputs", []) == []
        assert f"Exercise {number}: your answer here" in s.source and len(s.source.splitlines()) == 1
        assert not s.metadata.get("jupyter", {}).get("source_hidden")  # the student sees where to write


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_everything_else_is_as_committed(copy, notebook):
    teacher = json.loads((SOURCE / notebook).read_text(encoding="utf-8"))
    ours = json.loads((copy / notebook).read_text(encoding="utf-8"))
    assert ours["metadata"] == teacher["metadata"]
    for t, s in zip(teacher["cells"], ours["cells"], strict=True):
        source = "".join(t["source"])
        if is_solution({"source": source}):
            continue
        if t["cell_type"] == "markdown":  # the two phrases that would be false in the student copy
            source = "### Your answers" if source.strip() == "### Solutions" else source.replace(
                "(solutions below, collapsed in JupyterLab: click the margin to open them)",
                "(answer each in its empty cell below)")
            assert "".join(s["source"]) == source
            s, t = {**s, "source": None}, {**t, "source": None}
        assert s == t


def test_nbgrader_source_version_marks_each_solution(tmp_path):
    """The layout nbgrader's generate_assignment reads (checked by hand with nbgrader 0.9.6, not installed here)."""
    out = tmp_path / "course"
    assert student.main(["--out", str(tmp_path / "student"), "--nbgrader", str(out)]) == 0
    kinds = set()
    for notebook in NOTEBOOKS:
        teacher = nbformat.read(SOURCE / notebook, as_version=4)
        marked = nbformat.read(out / "source" / notebook, as_version=4)
        plain = nbformat.read(tmp_path / "student" / notebook, as_version=4)
        for t, m, p in zip(teacher.cells, marked.cells, plain.cells, strict=True):
            if not is_solution(t):
                assert m == p  # as in the student copy
                continue
            meta, number = m.metadata["nbgrader"], student.exercise_of(t)
            assert meta["solution"] and meta["schema_version"] == 3 and not m.metadata.get("jupyter")
            kinds.add(t.cell_type)
            if t.cell_type == "code":  # a solution region, not graded
                assert not meta["grade"] and m.outputs == []
                assert m.source == f"# Exercise {number}\n### BEGIN SOLUTION\n{t.source.rstrip()}\n### END SOLUTION"
            else:  # nbgrader accepts a markdown answer only as a manually graded cell
                assert meta["grade"] and meta["points"] == 0 and m.source == t.source
        ids = [c.metadata["nbgrader"]["grade_id"] for c in marked.cells if "nbgrader" in c.metadata]
        assert len(ids) == len(set(ids)) > 0 and all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)
    assert kinds == {"code", "markdown"}


def code_after_a_solution(notebook: Path) -> bool:
    """Whether any code cell that is not a solution comes after the notebook's first solution cell."""
    cells = [c for c in nbformat.read(SOURCE / notebook, as_version=4).cells if c.cell_type == "code"]
    first = next((i for i, c in enumerate(cells) if is_solution(c)), len(cells))
    return any(not is_solution(c) for c in cells[first:])


RUN = [p for p in NOTEBOOKS if code_after_a_solution(p)]
PREFIX = [p for p in NOTEBOOKS if not code_after_a_solution(p)]


@pytest.mark.parametrize("notebook", PREFIX, ids=[str(p) for p in PREFIX])
def test_student_notebook_is_what_nbval_runs_in_the_teachers(copy, notebook):
    """Where every solution comes after the last other code cell, the student notebook's code is exactly the
    teacher's code before the solutions, in order: `make test`'s strict nbval run of the teacher's notebook
    executes that sequence top to bottom in a fresh kernel at the ci profile before it reaches a solution, so
    it is a run of the student notebook (the placeholders, empty, run nothing). Only the notebooks with code
    after a solution need a run of their own (the next test)."""
    teacher = [c.source for c in nbformat.read(SOURCE / notebook, as_version=4).cells
               if c.cell_type == "code" and not is_solution(c)]
    placeholders = lambda c: c.source.endswith("your answer here\n")  # noqa: E731
    cells = nbformat.read(copy / notebook, as_version=4).cells
    ours = [c.source for c in cells if c.cell_type == "code" and not placeholders(c)]
    assert ours == teacher
    empty = [c for c in cells if c.cell_type == "code" and placeholders(c)]
    assert empty and all(c.outputs == [] and c.source.startswith("# Exercise") for c in empty)
    assert (ROOT / "notebooks" / notebook).is_file()  # so `make test` runs it under nbval


def test_the_notebooks_with_code_after_a_solution_are_few():
    """Every notebook is covered by one of the two tests; most put their solutions last."""
    assert sorted(RUN + PREFIX) == NOTEBOOKS and len(PREFIX) > len(RUN)


@pytest.mark.parametrize("notebook", RUN, ids=[str(p) for p in RUN])
def test_student_notebook_runs_top_to_bottom_at_ci(copy, notebook, tmp_path):
    """Nothing later in a notebook needs a name that only a solution defined. The notebook runs in its own
    process (nbconvert), apart from the kernels nbval drives in this worker.

    Its kernel talks over Unix sockets (`KernelManager.transport=ipc`), not TCP: jupyter_client picks a TCP
    kernel's five ports by binding and releasing them, so a kernel launched at the same moment as an nbval
    kernel in the other worker can be handed the same ports. That race is the likely cause of the one stall
    seen (a fresh-clone CI run: for several minutes the kernel sat idle while nbconvert waited for a reply;
    the test passed in the end, and `make test` took 1375 s instead of about 570)."""
    env = {**os.environ, "SCRATCHLM_PROFILE": "ci", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MPLBACKEND", None)
    executed = tmp_path / notebook.name
    done = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                           "--ExecutePreprocessor.timeout=1200", "--ExecutePreprocessor.kernel_name=python3",
                           "--KernelManager.transport=ipc",
                           "--output", str(executed), str(copy / notebook)],
                          cwd=(copy / notebook).parent, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    nb = nbformat.read(executed, as_version=4)
    placeholders = [c for c in nb.cells if c.cell_type == "code" and c.source.endswith("your answer here\n")]
    assert placeholders and all(c.outputs == [] for c in placeholders)
