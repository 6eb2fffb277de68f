"""What the committed notebooks must hold for a reader who opens them before running anything.

- a kernelspec, so JupyterLab starts Python 3 without asking;
- after every progress bar, a plain line with the time taken: saved notebooks keep only a bar's
  first frame ("0%| 0/2000"), so without that line a static view shows no result of the loop;
- next to every interactive widget, a static rendering of its first choice (a figure, HTML or text):
  JupyterLab 4, GitHub and nbviewer do not restore saved widget state, and show the widget's raw repr.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
WIDGET = "application/vnd.jupyter.widget-view+json"
BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/2000"
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
        first_lines = "".join(cell["source"]).splitlines()[:3]
        if any(line.startswith(("# Exercise", "Exercise")) for line in first_lines):
            assert hidden.get("source_hidden") and hidden.get("outputs_hidden"), (
                f"{path.name}, cell {index}: a solution must hide its source and its outputs")
        if hidden.get("source_hidden") and not diagram:
            assert hidden.get("outputs_hidden"), f"{path.name}, cell {index}: source hidden, outputs shown"
