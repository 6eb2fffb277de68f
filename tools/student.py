"""`make student`: a copy of notebooks/ for a class, with every exercise's solution replaced by an empty cell.

    python tools/student.py                  # writes student/ (git-ignored)
    python tools/student.py --out DIR        # somewhere else
    python tools/student.py --nbgrader DIR   # also an nbgrader course folder: DIR/source/<chapter>/<notebook>

A solution is a cell whose first line names it, "# Solution to exercise N" (code) or "**Solution to exercise N**"
(markdown), as tests/test_notebooks.py finds them. In the student copy it becomes an empty cell saying which exercise it
answers, with no output; the exercise's prompt stays in the summary's markdown, and every other cell is
as committed, outputs included. Two phrases that would be false in the copy are reworded: the heading
"### Solutions" and "(solutions below, collapsed ...)" in the exercise list.

With --nbgrader, each solution cell is wrapped in `### BEGIN SOLUTION` / `### END SOLUTION` under a line
naming its exercise, and marked with nbgrader's cell metadata (solution, not graded; a written answer in
markdown is a manually graded cell worth 0 points, as nbgrader requires), so that
`nbgrader generate_assignment <chapter>` run in DIR makes the release version (nbgrader's own rules:
"# YOUR CODE HERE" and `raise NotImplementedError()` in place of each solution, and every output
cleared). nbgrader is not a dependency of the course: install it to use that.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
# a solution's first line: "# Solution to exercise 3", "**Solution to exercise 5**", "# Solution to exercises 1 and 2"
EXERCISE = re.compile(r"^(?:#\s*|\*\*)?Solution to exercises?\s+(\d+[a-z]?(?:(?:,\s*|\s+and\s+)\d+[a-z]?)*)")
SOLUTIONS_HEADING = "### Solutions"
SOLUTIONS_BELOW = re.compile(r"\(solutions below, collapsed[^)]*\)")


def notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def exercise_of(cell) -> str | None:
    """The exercise a solution cell answers ("3"), or None for any other cell."""
    if cell.cell_type not in ("code", "markdown"):
        return None
    first_line = cell.source.split("\n", 1)[0]
    if not first_line.startswith(("# Solution to exercise", "**Solution to exercise")):  # tests/test_notebooks.py's rule
        return None
    match = EXERCISE.match(first_line)
    if match is None:
        raise ValueError(f"a solution cell without an exercise number: {first_line!r}")
    return match.group(1)


def placeholder(cell, number: str):
    """The empty cell a student answers in: which exercise, no solution, no output, not collapsed."""
    if cell.cell_type == "code":
        new = nbformat.v4.new_code_cell(f"# Exercise {number}: your answer here\n")
    else:
        new = nbformat.v4.new_markdown_cell(f"*Exercise {number}: your answer here.*")
    if "id" in cell:  # the same id: a teacher's diff of the two copies lines the cells up
        new.id = cell.id
    return new


def nbgrader_solution(cell, number: str, notebook: str):
    """The solution cell as nbgrader's source version marks it: solution region, not graded."""
    new = nbformat.from_dict(dict(cell))
    new.metadata = {key: value for key, value in cell.metadata.items() if key != "jupyter"}  # not collapsed
    grade_id = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{notebook}-exercise-{number}")  # nbgrader allows only these
    new.metadata["nbgrader"] = {"grade": False, "grade_id": grade_id, "locked": False,
                                "schema_version": 3, "solution": True, "task": False}
    if cell.cell_type == "markdown":  # nbgrader's rule: a written answer is a manually graded cell (0 points here)
        new.metadata["nbgrader"].update(grade=True, points=0)
    if cell.cell_type == "code":
        new.source = f"# Exercise {number}\n### BEGIN SOLUTION\n{cell.source.rstrip()}\n### END SOLUTION"
        new.outputs, new.execution_count = [], None
    return new


def reword(cell):
    if cell.cell_type == "markdown":
        if cell.source.strip() == SOLUTIONS_HEADING:
            cell.source = "### Your answers"
        cell.source = SOLUTIONS_BELOW.sub("(answer each in its empty cell below)", cell.source)
    return cell


def student_version(nb):
    """A copy of the notebook with each solution replaced by a placeholder; returns (notebook, exercise numbers)."""
    nb = nbformat.from_dict(nb)
    cells, numbers = [], []
    for cell in nb.cells:
        number = exercise_of(cell)
        if number is None:
            cells.append(reword(cell))
        else:
            numbers.append(number)
            cells.append(placeholder(cell, number))
    nb.cells = cells
    return nb, numbers


def nbgrader_version(nb, notebook: str):
    nb = nbformat.from_dict(nb)
    nb.cells = [reword(cell) if (n := exercise_of(cell)) is None else nbgrader_solution(cell, n, notebook)
                for cell in nb.cells]
    return nb


def write(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.validate(nb)
    nbformat.write(nb, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "notebooks", help="the teacher's notebooks")
    parser.add_argument("--out", type=Path, default=ROOT / "student", help="where the student copy goes")
    parser.add_argument("--nbgrader", type=Path, metavar="DIR", help="also write an nbgrader course folder here")
    args = parser.parse_args(argv)
    source, out = args.source.resolve(), args.out.resolve()
    if out == source or source in out.parents:
        parser.error(f"--out {out} is inside the notebooks it copies")
    found = notebooks(source)
    if not found:
        parser.error(f"no notebooks under {source}")
    if out.exists():
        shutil.rmtree(out)  # a fresh copy: nothing left from an older run
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.ipynb"))
    total = 0
    for path in found:
        relative = path.relative_to(source)
        nb = nbformat.read(path, as_version=4)
        student, numbers = student_version(nb)
        write(student, out / relative)
        total += len(numbers)
        if args.nbgrader is not None:
            write(nbgrader_version(nb, path.stem), args.nbgrader.resolve() / "source" / relative)
        print(f"{relative}: exercises {', '.join(numbers) if numbers else 'none'}")
    print(f"{len(found)} notebooks, {total} solutions replaced, in {out}")
    if args.nbgrader is not None:
        print(f"nbgrader source version in {args.nbgrader / 'source'} (one assignment per chapter folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
