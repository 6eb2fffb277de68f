"""Show each saved tqdm bar of an executed notebook at its end, not at its first frame.

    python tools/finish_bars.py NB [NB ...]           rewrite the notebooks in place
    python tools/finish_bars.py --check NB [NB ...]   exit 1 and list the notebooks that would change

An executed notebook keeps a tqdm.auto bar (an ipywidgets HBox of HTML, FloatProgress, HTML) as a
display_data output whose text/plain fallback tqdm wrote when the bar appeared: "train:   0%|          |
0/2000 [00:00<?, ?it/s]". JupyterLab shows that fallback for an untrusted notebook (a fresh clone), so
a finished loop looks stuck at 0%. The final state of the bar is saved too, in the notebook's
metadata.widgets; this tool rebuilds tqdm's own text from it ("train: 100%|██████████| 2000/2000
[02:23<00:00, 13.79it/s]") and writes it in place of the first frame.

Only that text/plain changes: every other output, the widget state and the rest of the file stay as they
are, and the file is written as nbformat writes it (sorted keys, indent 1, a final newline). A notebook
with nothing to change is not written at all, and a second run changes nothing. An output whose model is
missing from the saved state (a notebook saved without widget state) is left alone, and so is a bar closed
with leave=False whose saved texts stopped before its end. Standard library only: `make execute` runs it
after nbconvert.

The bar is drawn with tqdm's unicode blocks, as tqdm draws it in a terminal; the text/plain tqdm itself
gives a widget uses ASCII ("##########"), but only its first frame, with an empty bar, is ever saved.
"""

import argparse
import html
import json
import re
import sys
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PROGRESS_MODELS = ("FloatProgressModel", "IntProgressModel")
# tqdm.std.Bar's unicode charset: blank, the seven partial blocks ▏▎▍▌▋▊▉, the full block
BAR_CHARSET = " " + "".join(map(chr, range(0x258F, 0x2587, -1)))
BAR_WIDTH = 10  # tqdm's bar when ncols is unknown, as in a notebook's text/plain
PERCENT_AT_END = re.compile(r"\d+%$")  # the left text of a bar with a total: "train: 100%"
# the right text of a bar without a total: " 123/? [00:01<00:00, 99.20it/s, loss=1.2]" (" 0/0 [...]" for total=0)
COUNTS_WITHOUT_TOTAL = re.compile(r"^ (?P<n>\S+)/\S+ \[(?P<elapsed>[\d:]+)<[^,\]]*, (?P<rate>[^,\]]+)(?P<postfix>[^\]]*)\]$")
# tqdm's rate_fmt: "?it/s", "99.20it/s", "931kit/s" (unit_scale) or "3.45s/it"
RATE = re.compile(r"^(?:(?:\?|[\d.]+[kMGTPEZY]?)(?P<unit>[^/]+)/s|[\d.]+[kMGTPEZY]?s/(?P<inverse_unit>.+))$")


def text_of(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def html_text(value: str) -> str:
    """An HTML widget's value as plain text: tqdm escapes <, > and & and pads with U+2007 (figure space)."""
    return html.unescape(value).replace("\u2007", " ").replace("\xa0", " ")


def bar(fraction: float) -> str:
    """tqdm.std.Bar with its default charset and width: "█████▌    " for 0.55."""
    fraction = min(max(fraction, 0.0), 1.0)
    symbols = len(BAR_CHARSET) - 1
    full, partial = divmod(int(fraction * BAR_WIDTH * symbols), symbols)
    if full >= BAR_WIDTH:
        return BAR_CHARSET[-1] * BAR_WIDTH
    return BAR_CHARSET[-1] * full + BAR_CHARSET[partial] + BAR_CHARSET[0] * (BAR_WIDTH - full - 1)


def without_total(left: str, right: str) -> str | None:
    """tqdm's text for a bar without a total, "merges: 123it [00:01, 99.20it/s]", from the widget's two texts
    "merges: " and " 123/? [00:01<00:00, 99.20it/s]"; None where they are not in that form."""
    counts = COUNTS_WITHOUT_TOTAL.match(right)
    if not counts or (left and not left.endswith(": ")):
        return None
    rate = RATE.match(counts["rate"])
    if not rate:
        return None
    return f"{left}{counts['n']}{rate['unit'] or rate['inverse_unit']} [{counts['elapsed']}, {counts['rate']}{counts['postfix']}]"


def model_id(reference) -> str | None:
    return reference[len("IPY_MODEL_"):] if isinstance(reference, str) and reference.startswith("IPY_MODEL_") else None


def final_text(models: dict, view_id: str) -> str | None:
    """tqdm's text for the saved final state of the bar `view_id`, or None where it is not a saved tqdm bar."""
    box = models.get(view_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    children = [models.get(model_id(ref) or "") for ref in box.get("state", {}).get("children", [])]
    if len(children) != 3 or not all(children):
        return None
    left, progress, right = children
    if (left.get("model_name"), right.get("model_name")) != ("HTMLModel", "HTMLModel"):
        return None
    if progress.get("model_name") not in PROGRESS_MODELS:
        return None
    left_text = html_text(left.get("state", {}).get("value", ""))
    right_text = html_text(right.get("state", {}).get("value", ""))
    state = progress.get("state", {})
    low, high, value = (float(state.get(key) or 0) for key in ("min", "max", "value"))
    fraction = (value - low) / (high - low) if high > low else 0.0
    percent = PERCENT_AT_END.search(left_text)
    # A bar closed with leave=False is hidden (its layout's visibility), and its texts are those of its last
    # refresh, not of its end: the progress value is. Such texts are used only where they agree with the value.
    layout = models.get(model_id(box["state"].get("layout")) or "", {}).get("state", {})
    if layout.get("visibility") == "hidden":
        count = re.match(r" (\d+)/", right_text)
        if not percent or percent[0] != f"{fraction * 100:.0f}%" or (count and float(count[1]) != value - low):
            return None
    if not percent:  # no total: the widget shows "desc: " and " 123/? [...]"
        return without_total(left_text, right_text)
    return f"{left_text}|{bar(fraction)}|{right_text}"


def as_saved(text: str, like):
    """`text` in the shape nbformat saves a multiline string in: a list of lines where `like` is a list."""
    return text.splitlines(True) if isinstance(like, list) else text


def finish(notebook: dict) -> int:
    """Rewrite, in `notebook`, the text/plain of each saved tqdm bar to its final state; the number changed."""
    models = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    if not models:
        return 0
    changed = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            view = data.get(WIDGET_VIEW)
            if not isinstance(view, dict) or "text/plain" not in data:
                continue
            text = final_text(models, view.get("model_id", ""))
            if text is not None and text != text_of(data["text/plain"]):
                data["text/plain"] = as_saved(text, data["text/plain"])
                changed += 1
    return changed


def nbformat_text(notebook: dict) -> str:
    """What nbformat.write(notebook, f) writes for a v4 notebook whose strings are already split in lines."""
    return json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NB")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 and list the notebooks that would change")
    args = parser.parse_args(argv)
    stale = []
    for path in args.notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        changed = finish(notebook)
        if not changed:
            continue
        stale.append(path)
        if args.check:
            print(f"{path}: {changed} progress bar(s) saved at their first frame; run tools/finish_bars.py {path}")
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(nbformat_text(notebook))
            print(f"{path}: {changed} progress bar(s) finished")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
