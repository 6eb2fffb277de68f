"""Build the course's website from the executed notebooks, with nothing fetched from the internet.

    python tools/site/build.py [--out site] [--notebooks notebooks]

Every `notebooks/<chapter>/<NN_topic>.ipynb` becomes `<out>/<chapter>/<NN_topic>.html` through nbconvert's
HTML exporter (JupyterLab's look, the template in tools/site/template/scratchlm), as committed: nothing is
re-executed. `<out>/index.html` lists the chapters and notebooks in order; each page links to the index and
to the previous and next notebook. Exercise solutions stay collapsed (<details>), concept diagrams show
their figure with the drawing code collapsed, and math is typeset by the MathJax 3 that `npm ci` installed
in tools/site/node_modules and that is copied into `<out>/_static/mathjax`.
"""

import argparse
import html
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.filters import markdown2html

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MATHJAX = HERE / "node_modules" / "mathjax" / "es5"
MATHJAX_SCRIPT = "tex-svg-full.js"  # SVG output: no web fonts to fetch
STATIC = "_static"
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/2000"
# a solution's first line: "# Solution to exercise 3", "**Solution to exercise 5**", "# Solution to exercises 1 and 2"
EXERCISE = re.compile(r"^(?:#\s*|\*\*)?Solution to exercises?\s+(\d+(?:(?:, | and )\d+)*)")
WIDGET_REPR = re.compile(r"^\w+\(")  # "interactive(children=(...", "HBox(children=(...", "IntProgress(value=0"
# a chapter's folder is "NN_name"; the names read better spelled out
CHAPTER_NAMES = {"tokenizer": "Tokenizers", "attention": "Attention", "gpt": "GPT-2", "llama": "The Llama family",
                 "deepseek": "DeepSeek: mixture of experts and latent attention", "alignment": "Alignment",
                 "encoders": "Encoders and encoder–decoders"}


@dataclass
class Page:
    notebook: Path  # notebooks/01_tokenizer/01_characters_and_bigram.ipynb
    href: str       # 01_tokenizer/01_characters_and_bigram.html, relative to the site's root
    title: str      # the notebook's first heading
    chapter: str    # "01 · Tokenizers"


def chapter_title(folder: str) -> str:
    number, _, name = folder.partition("_")
    return f"{number} · {CHAPTER_NAMES.get(name, name.replace('_', ' ').capitalize())}"


def notebook_title(nb) -> str:
    """The first markdown heading, without its markdown: '01 · Characters and a bigram baseline'."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return re.sub(r"[`*_]", "", line.lstrip("#").strip())
    raise SystemExit(f"{nb.metadata.get('path', 'a notebook')} has no markdown heading: give it a '# Title' cell")


def discover(notebooks: Path) -> list[Page]:
    paths = sorted(p for p in notebooks.glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not paths:
        raise SystemExit(f"no notebooks found under {notebooks}/<chapter>/*.ipynb")
    pages = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nb.metadata["path"] = str(path)
        pages.append(Page(path, f"{path.parent.name}/{path.stem}.html", notebook_title(nb),
                          chapter_title(path.parent.name)))
    return pages


def solution_label(cell) -> str:
    """'# Solution to exercise 2' -> 'Solution to exercise 2'; '# Solution to exercises 1 and 2' -> 'Solution to
    exercises 1 and 2'. A solution's first line names it and gives nothing away (the answer starts below it)."""
    for line in cell.source.splitlines()[:1]:
        match = EXERCISE.match(line)
        if match:
            numbers = match.group(1)
            return f"Solution to exercise{'s' if re.search(r'[^0-9]', numbers) else ''} {numbers}"
    return "Solution"


def widget_note(data) -> str:
    """What a page shows for a widget. Nothing for a progress bar: its saved first frame ("0%|") says nothing
    and the line printed after the loop gives the result. The widget's own text when the notebook wrote one
    ("[dropdowns for the layer, head and sentence: run the notebook in JupyterLab to use them]"), else a
    general note instead of its Python repr ("interactive(children=(Dropdown(...")."""
    text = data.get("text/plain", "")
    if PROGRESS_BAR.search(text):
        return ""
    if not text.strip() or WIDGET_REPR.match(text):
        return "An interactive widget: open this notebook in JupyterLab to use it."
    return text


def link_notebooks(page_html: str) -> str:
    """Links between notebooks (`../03_gpt/01_gpt_model.ipynb#anchor`) point at their pages."""
    return re.sub(r'href="(?![a-z]+:)([^"#]+)\.ipynb(#[^"]*)?"', r'href="\1.html\2"', page_html)


def exporter() -> HTMLExporter:
    exp = HTMLExporter(template_name="scratchlm", extra_template_basedirs=[str(HERE / "template")])
    exp.exclude_input_prompt = True
    exp.exclude_output_prompt = True
    exp.register_filter("solution_label", solution_label)
    exp.register_filter("widget_note", widget_note)
    exp.mathjax_url = f"../{STATIC}/mathjax/{MATHJAX_SCRIPT}"  # every page is one folder down
    return exp


def clear(out: Path) -> None:
    """Start from an empty folder, so a renamed notebook leaves no stale page; never empty a folder that is
    not a previous build."""
    if out.exists() and any(out.iterdir()):
        if not (out / STATIC / "site.css").is_file():
            raise SystemExit(f"{out} is not empty and holds no previous build of the site: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def copy_static(out: Path) -> None:
    static = out / STATIC
    shutil.copytree(MATHJAX, static / "mathjax")
    shutil.copy2(HERE / "static" / "site.css", static / "site.css")


def write_index(out: Path, pages: list[Page]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n")
    heading = readme[0].lstrip("# ").strip()
    chapters: dict[str, list[Page]] = {}
    for page in pages:
        chapters.setdefault(page.chapter, []).append(page)
    items = "\n".join(
        f'<li><h2>{html.escape(chapter)}</h2>\n<ul class="site-notebooks">\n'
        + "\n".join(f'<li><a href="{p.href}">{html.escape(p.title)}</a></li>' for p in chapter_pages)
        + "\n</ul></li>" for chapter, chapter_pages in chapters.items())
    (out / "index.html").write_text(f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(heading)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{STATIC}/site.css">
</head>
<body class="site-index">
<main>
<h1>{html.escape(heading)}</h1>
{markdown2html(readme[1])}
<p>These pages are the notebooks as committed, with their outputs. To run and change them, clone the
repository and run <code>make lab</code>. Exercise solutions are folded: click one to open it.</p>
<ul class="site-chapters">
{items}
</ul>
<p class="site-next-title">Start: <a href="{pages[0].href}">{html.escape(pages[0].title)}</a></p>
</main>
</body>
</html>
""", encoding="utf-8")


def build(out: Path, notebooks: Path) -> list[Page]:
    if not (MATHJAX / MATHJAX_SCRIPT).is_file():
        raise SystemExit(f"MathJax is missing ({MATHJAX / MATHJAX_SCRIPT}); install it with "
                         f"`npm ci --prefix {HERE.relative_to(ROOT)}` (Node.js and npm needed), or run `make site`")
    pages = discover(notebooks)
    exp = exporter()
    clear(out)
    copy_static(out)
    for k, page in enumerate(pages):
        nb = nbformat.read(page.notebook, as_version=4)
        nb.metadata["title"] = page.title
        up = "../"  # every page is one folder down
        resources = {
            "site": {
                "index": f"{up}index.html", "static": f"{up}{STATIC}", "chapter": page.chapter,
                "previous": {"href": up + pages[k - 1].href, "title": pages[k - 1].title} if k > 0 else None,
                "next": {"href": up + pages[k + 1].href, "title": pages[k + 1].title} if k + 1 < len(pages) else None,
            },
        }
        body, _ = exp.from_notebook_node(nb, resources=resources)
        target = out / page.href
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(link_notebooks(body), encoding="utf-8")
    write_index(out, pages)
    return pages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="where to write the site (default: site/)")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="the course's notebooks")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pages = build(args.out, args.notebooks)
    print(f"{len(pages)} notebooks in {len({p.chapter for p in pages})} chapters -> {args.out / 'index.html'} "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
