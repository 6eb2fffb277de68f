"""What the committed notebooks must hold for a reader who opens them before running anything.

- a kernelspec, so JupyterLab starts Python 3 without asking;
- after every progress bar, a plain line with the time taken: a static view (GitHub, nbviewer) shows a bar's
  saved text, not its widget, so without that line it shows no result of the loop;
- every saved progress bar finished: its text drawn from its final widget state by tools/finish_bars.py
  ("100%|██████████| 2000/2000"), not the first frame tqdm wrote ("0%|          | 0/2000"), which an
  untrusted notebook (a fresh clone) shows in JupyterLab above the loop's "2,000 steps in 75.9 s";
- next to every interactive widget, a static rendering of its first choice (a figure, HTML or text):
  JupyterLab 4, GitHub and nbviewer do not restore saved widget state, and show the widget's raw repr.
"""

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
WIDGET = "application/vnd.jupyter.widget-view+json"
BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/2000", finished "100%|██████████| 2000/2000"
# transformers' own bars for saving and loading a checkpoint (one step, over at once): no loop of the course
LIBRARY_BAR = re.compile(r"^(Writing model shards|Loading weights|Loading checkpoint shards)\b")
TIME_TAKEN = re.compile(r"\b\d+(\.\d+)? ?s\b")  # "bigram: 5,000 steps in 9.8 s", "GPT: 163 s (9,405 tokens/s)"


def names(paths):
    return [str(p.relative_to(ROOT / "notebooks")) for p in paths]


def text_of(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def code_cells(path: Path):
    for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code":
            yield index, cell


def is_bar(output) -> bool:
    if output["output_type"] == "stream":
        return output["name"] == "stderr" and bool(BAR.search(text_of(output["text"])))
    data = output.get("data", {})
    text = text_of(data.get("text/plain", ""))
    return WIDGET in data and bool(BAR.search(text)) and not LIBRARY_BAR.match(text.strip("'\""))


def is_static(output) -> bool:
    if output["output_type"] == "stream":
        return output["name"] == "stdout" and text_of(output["text"]).strip() != ""
    data = output.get("data", {})
    return WIDGET not in data and any(kind in data for kind in ("image/png", "image/svg+xml", "text/html"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 14, names(NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_notebook_names_its_kernel(path):
    kernelspec = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("kernelspec")
    assert kernelspec and kernelspec.get("name") == "python3" and kernelspec.get("language") == "python", (
        f"{path.name} has no python3 kernelspec ({kernelspec}); JupyterLab would ask which kernel to use")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_every_progress_bar_is_followed_by_a_line_with_its_time(path):
    for index, cell in code_cells(path):
        outputs = cell.get("outputs", [])
        bars = [k for k, output in enumerate(outputs) if is_bar(output)]
        if not bars:
            continue
        # each bar gets its own time: as many mentions of seconds after the first bar as there are bars
        # (one line after each loop, or one table after several, as in 05_deepseek/02)
        after = "".join(text_of(o["text"]) for o in outputs[bars[0] + 1 :]
                        if o["output_type"] == "stream" and o["name"] == "stdout")
        assert len(TIME_TAKEN.findall(after)) >= len(bars), (
            f"{path.name}, cell {index}: {len(bars)} progress bar(s) but fewer printed times after them "
            f"(loop with scratchlm.data.progress, or print 'N steps in T s, final loss ...' after the loop)")


def load_finish_bars():
    spec = importlib.util.spec_from_file_location("finish_bars", ROOT / "tools" / "finish_bars.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finish_bars = load_finish_bars()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_every_saved_progress_bar_is_finished(path, capsys):
    assert finish_bars.main(["--check", str(path)]) == 0, (
        f"{capsys.readouterr().out.strip()}\n(make execute runs it after nbconvert; a notebook executed otherwise "
        f"shows its bars at 0% when untrusted)")


def test_finish_bars_rebuilds_tqdms_text_from_the_saved_state():
    def model(name, **state):
        return {"model_name": name, "state": state}

    models = {
        "box": model("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"], layout="IPY_MODEL_lay"),
        "lay": model("LayoutModel", visibility=None),
        "l": model("HTMLModel", value="train:\u2007\u200755%"),
        "p": model("FloatProgressModel", min=0.0, max=700.0, value=385.0, bar_style="danger"),
        "r": model("HTMLModel", value="\u2007385/700\u2007[00:07&lt;00:06,\u200755.01it/s,\u2007loss=1.5]"),
    }

    def output(model_id):
        return {"data": {WIDGET: {"model_id": model_id, "version_major": 2, "version_minor": 0},
                         "text/plain": ["train:   0%|          | 0/700 [00:00<?, ?it/s]"]},
                "metadata": {}, "output_type": "display_data"}

    notebook = {"cells": [{"cell_type": "code", "outputs": [output("box"), output("gone")]}],
                "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": models}}}}
    assert finish_bars.finish(notebook) == 1
    bar, missing = notebook["cells"][0]["outputs"]
    assert bar["data"]["text/plain"] == ["train:  55%|█████▌    | 385/700 [00:07<00:06, 55.01it/s, loss=1.5]"]
    assert missing == output("gone")  # its model is not in the saved state: left alone
    assert is_bar(bar) and finish_bars.finish(notebook) == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_every_widget_has_a_static_rendering(path):
    for index, cell in code_cells(path):
        outputs = cell.get("outputs", [])
        widgets = [o for o in outputs if WIDGET in o.get("data", {}) and not is_bar(o)]
        if widgets:
            assert any(is_static(o) for o in outputs), (
                f"{path.name}, cell {index}: a widget without a static rendering of its first choice; viewers that "
                f"do not run the kernel show only {text_of(widgets[0]['data'].get('text/plain', ''))[:60]!r}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_solutions_hide_their_outputs_too(path):
    """A solution whose source is collapsed but whose output is not prints the answer under the exercise.

    The only cells with a collapsed source and a visible output are concept diagrams (tag "diagram"): the
    reader sees the figure, and can open the drawing code.
    """
    for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        hidden = cell["metadata"].get("jupyter", {})
        diagram = "diagram" in cell["metadata"].get("tags", [])
        if is_solution(cell):
            assert hidden.get("source_hidden") and hidden.get("outputs_hidden"), (
                f"{path.name}, cell {index}: a solution must hide its source and its outputs")
        if hidden.get("source_hidden") and not diagram:
            assert hidden.get("outputs_hidden"), f"{path.name}, cell {index}: source hidden, outputs shown"


def is_solution(cell) -> bool:
    """A solution's first line names it: "# Solution to exercise 3" (code), "**Solution to exercise 5**" (markdown)."""
    return "".join(cell["source"]).startswith(SOLUTION_STARTS)


SOLUTION_STARTS = ("# Solution to exercise", "**Solution to exercise")
# a first line that looks like a solution's old or misspelt title
LOOKS_LIKE_A_SOLUTION = re.compile(r"^(#\s*|\*\*)?(Exercises?\s+\d|Solutions?\s+(to|for)\s+exercise)", re.IGNORECASE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_every_solution_says_so_in_its_first_line_under_a_solutions_heading(path):
    """JupyterLab shows a collapsed cell as its first line: "# Solution to exercise 2 •••" tells the reader what
    is folded there, where "# NBVAL_IGNORE_OUTPUT •••" did not, and "# Exercise 2: the larger base ..." gave the
    answer away. tools/student.py and the website find the solutions by that line too."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    solutions = [k for k, cell in enumerate(cells) if is_solution(cell)]
    for index, cell in enumerate(cells):
        first = "".join(cell["source"]).split("\n", 1)[0]
        hidden = cell["metadata"].get("jupyter", {}).get("source_hidden")
        diagram = "diagram" in cell["metadata"].get("tags", [])
        if index not in solutions:
            assert not LOOKS_LIKE_A_SOLUTION.match(first), (
                f"{path.name}, cell {index}: {first!r} reads like a solution's first line; write "
                f"'# Solution to exercise N' (code) or '**Solution to exercise N**' (markdown)")
            assert not (hidden and cell["cell_type"] == "code" and not diagram and index > (solutions or [len(cells)])[0]), (
                f"{path.name}, cell {index}: a collapsed cell among the solutions that does not say which it is")
        else:
            assert re.match(r"^(# |\*\*)Solution to exercises? \d+[a-z]?((, | and )\d+[a-z]?)*(\*\*)?$", first), (
                f"{path.name}, cell {index}: the first line names the exercise and nothing more: {first!r}")
    assert solutions, f"{path.name} has no solutions"
    headings = [k for k, cell in enumerate(cells) if cell["cell_type"] == "markdown"
                and "".join(cell["source"]).strip() == "### Solutions"]
    assert len(headings) == 1 and headings[0] < solutions[0], (
        f"{path.name}: one markdown cell '### Solutions' before the first solution (found at {headings})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_no_committed_warnings(path):
    """A warning in a committed output shows as a red box with the author's paths in it. Silence a library's
    deprecation notice with a narrow filter in the notebook, saying why; fix a warning that is the course's."""
    for index, cell in code_cells(path):
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream" and output["name"] == "stderr":
                text = text_of(output["text"])
                assert not re.search(r"\w*(Warning|warn)\b", text), (
                    f"{path.name}, cell {index}: a warning on stderr: {text[:200]!r}")


def parse_cell(source: str):
    """A code cell's syntax tree, its IPython magics (% and !) left out."""
    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))


def bound_names(source: str) -> set[str]:
    """The names a cell binds at its top level (assignments, loop targets, defs, classes), imports left out."""
    tree = parse_cell(source)
    names = set()
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
            continue
        for node in ast.walk(statement):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue  # a local of a function is not a notebook variable
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.NamedExpr)):
                targets = [node.target]
            elif isinstance(node, ast.With):
                targets = [item.optional_vars for item in node.items if item.optional_vars is not None]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def read_names(source: str) -> set[str]:
    """The notebook variables a cell reads: names loaded where neither the cell nor an enclosing function,
    lambda or comprehension binds them."""
    def stored(nodes) -> set[str]:
        return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    def reads(node, local: frozenset) -> set[str]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            params = {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            body = node.body if isinstance(node.body, list) else [node.body]
            inner = local | params | stored(body)
            return set().union(*(reads(child, frozenset(inner)) for child in body))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = local | stored(g.target for g in node.generators)
            return set().union(*(reads(child, frozenset(inner)) for child in ast.iter_child_nodes(node)))
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            return set() if node.id in local else {node.id}
        return set().union(*(reads(child, local) for child in ast.iter_child_nodes(node)))

    tree = parse_cell(source)
    return reads(tree, frozenset()) - bound_names(source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=names(NOTEBOOKS))
def test_diagram_cells_leave_the_notebooks_variables_alone(path):
    """A concept diagram's collapsed drawing code must not rebind a variable that the notebook made before it
    and reads after it.

    A diagram of BPE once set `text = "aaabdaaabac"`, and every later cell of that notebook (the tiktoken
    proof "on all of TinyShakespeare" among them) ran on eleven characters while nbval, comparing the
    outputs the same run had written, passed.
    """
    cells = [(index, text_of(cell["source"]), "diagram" in cell["metadata"].get("tags", []))
             for index, cell in code_cells(path)]
    made_before: set[str] = set()
    for position, (index, source, diagram) in enumerate(cells):
        bound = bound_names(source)
        if diagram:
            read_later = set().union(*(read_names(later) for _, later, _ in cells[position + 1:]))
            clobbered = sorted(bound & made_before & read_later)
            assert not clobbered, (f"{path.name}, cell {index}: the diagram rebinds {', '.join(clobbered)}, which "
                                   f"earlier cells made and later cells read; give its variables other names")
        else:
            made_before |= bound
