"""The course as a website (`make site`), checked in a real browser.

The site is built from the committed notebooks into a temporary folder, served over http on 127.0.0.1 and
opened page by page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright). Each notebook's
page must have its title, run no failing script, fetch nothing from outside the site (the site works with no
internet), show every figure of the notebook, typeset its math (no `$...$` left as text), keep exercise
solutions folded and concept diagrams' code folded under a visible figure, and link to the previous and next
notebook; every link inside the site must answer 200. One screenshot per chapter is saved in the test's
temporary folder (`pytest --basetemp=DIR` to choose it).

Needs Chromium and MathJax: `apt-get install -y chromium` and `npm ci --prefix tools/site` (`.ci/run` does
both). Without them the tests are skipped, with the reason, except under CI=true, where they fail.
"""

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
MATHJAX = ROOT / "tools" / "site" / "node_modules" / "mathjax" / "es5" / "tex-svg-full.js"
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
WIDGET = "application/vnd.jupyter.widget-view+json"
BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/2000"
MATH = re.compile(r"\$[^$\n]+\$|\\\(|\\\[")  # inline or display TeX left as text
LOAD_TIMEOUT_MS = 60_000  # a busy 2-core machine typesets a long page in seconds; this is far above that


def missing(what: str, how: str):
    """Fail under CI, where the site must be checked; skip elsewhere, saying how to install what is missing."""
    message = f"{what} is missing: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: .ci/run installs it before make test)", pytrace=False)
    pytest.skip(message)


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell) -> str:
    return "".join(cell["source"])


def href_of(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}.html"


def first_heading(path: Path) -> str:
    for cell in cells(path):
        if cell["cell_type"] == "markdown":
            for line in source(cell).splitlines():
                if line.startswith("#"):
                    return re.sub(r"[`*_]", "", line.lstrip("#").strip())
    raise AssertionError(f"{path.name} has no markdown heading")


def image_outputs(path: Path) -> int:
    return sum(1 for cell in cells(path) if cell["cell_type"] == "code" for output in cell.get("outputs", [])
               if any(kind in output.get("data", {}) for kind in IMAGE_TYPES))


def folded(path: Path) -> tuple[int, int]:
    """(solutions, concept diagrams): cells whose whole content is hidden, and code cells hiding only their source."""
    solutions = diagrams = 0
    for cell in cells(path):
        hidden = cell["metadata"].get("jupyter", {})
        if not hidden.get("source_hidden"):
            continue
        if cell["cell_type"] == "markdown" or hidden.get("outputs_hidden"):
            solutions += 1
        else:
            diagrams += 1
    return solutions, diagrams


def widgets(path: Path) -> int:
    """Widget outputs other than progress bars, each of which the page replaces by a line of text."""
    return sum(1 for cell in cells(path) if cell["cell_type"] == "code" for output in cell.get("outputs", [])
               if WIDGET in output.get("data", {}) and not BAR.search("".join(output["data"].get("text/plain", ""))))


def has_math(path: Path) -> bool:
    return any(MATH.search(source(c)) or "$$" in source(c) for c in cells(path) if c["cell_type"] == "markdown")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if not MATHJAX.is_file():
        missing("MathJax for the site", "run `npm ci --prefix tools/site` (Node.js and npm), or `make site`")
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "site" / "build.py"), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, f"tools/site/build.py failed:\n{run.stdout}\n{run.stderr}"
    print(f"site built in {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def base_url(site):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output for failures
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright's Python package", "pip install -e '.[dev]' (or pip install playwright); "
                "do not run `playwright install`, the test uses Debian's chromium")
    if not CHROMIUM.is_file():
        missing(f"Chromium ({CHROMIUM})", "apt-get install -y chromium (Debian/Ubuntu), or set CHROMIUM=/path/to/it")
    with sync_playwright() as playwright:
        # as root (Docker, CI) Chromium refuses to start with its sandbox
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def checked_links():
    """Every URL inside the site already fetched, with its body, so each is fetched once for all pages."""
    return {}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def page(browser, base_url):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    page.problems = []  # uncaught exceptions, console errors, requests that leave the site
    page.on("pageerror", lambda error: page.problems.append(f"uncaught: {error}"))
    page.on("console", lambda m: page.problems.append(f"console.{m.type}: {m.text} ({m.location.get('url')})")
            if m.type == "error" else None)
    page.on("request", lambda r: page.problems.append(f"request outside the site: {r.url}")
            if not r.url.startswith((base_url, "data:")) else None)
    yield page
    page.close()


def open_page(page, url: str):
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200, f"{url}: {response and response.status}"
    # the deferred MathJax script has run by the load event; its startup promise resolves once it has typeset
    if page.locator("#MathJax-script").count():
        started = page.evaluate("!!(window.MathJax && MathJax.startup && MathJax.startup.promise)")
        assert started, f"{url}: MathJax did not start; {page.problems or 'no error reported'}"
        page.evaluate("MathJax.startup.promise.then(() => true)")


def check_links(page, base_url: str, checked_links: dict) -> None:
    """Every link inside the site answers 200; a link to an anchor finds an element with that id."""
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    assert hrefs, f"{page.url} has no links"
    for href in hrefs:
        if not href.startswith(base_url):
            continue  # a link to the outside world (papers, GitHub): not fetched, the test runs offline
        url, fragment = urldefrag(href)
        if url not in checked_links:
            response = page.request.get(url)
            checked_links[url] = (response.status, response.text() if response.ok else "")
        status, body = checked_links[url]
        assert status == 200, f"{page.url} links to {href}: HTTP {status}"
        # as browsers do, the fragment names an id as written or percent-decoded (nbconvert writes
        # headings' ids percent-encoded: id="01-%C2%B7-Characters...")
        ids = {fragment, unquote(fragment)}
        if fragment and url != page.url.split("#")[0]:
            assert any(f'id="{i}"' in body for i in ids), f"{page.url} links to {href}: no element with that id there"
        elif fragment:
            assert page.evaluate("ids => ids.some(id => document.getElementById(id))", list(ids)), (
                f"{page.url} links to #{fragment}, which is not on the page")


def save_screenshots(page, stem: Path, solutions: int) -> None:
    """The top of the page, and the folded solutions at its end."""
    shots = [stem.with_name(stem.name + "-top.png")]
    page.screenshot(path=shots[0])
    if solutions:
        page.locator("details.site-solution > summary").first.scroll_into_view_if_needed()
        shots.append(stem.with_name(stem.name + "-solutions.png"))
        page.screenshot(path=shots[-1])
        page.evaluate("window.scrollTo(0, 0)")
    assert all(shot.stat().st_size > 10_000 for shot in shots), shots


def test_index_lists_every_notebook_in_order(page, base_url, checked_links):
    open_page(page, base_url + "index.html")
    listed = page.eval_on_selector_all(".site-notebooks a", "links => links.map(a => a.getAttribute('href'))")
    assert listed == [href_of(p) for p in NOTEBOOKS], "the index must list notebooks/*/*.ipynb in order"
    chapters = page.eval_on_selector_all(".site-chapters h2", "hs => hs.map(h => h.textContent)")
    assert [c.split(" ")[0] for c in chapters] == sorted({p.parent.name.split("_")[0] for p in NOTEBOOKS})
    check_links(page, base_url, checked_links)
    assert page.problems == [], page.problems


@pytest.mark.parametrize("index", range(len(NOTEBOOKS)), ids=[href_of(p) for p in NOTEBOOKS])
def test_notebook_page(page, base_url, checked_links, screenshots, index):
    path = NOTEBOOKS[index]
    open_page(page, base_url + href_of(path))

    # title: the notebook's first heading, in the tab and as the page's heading
    title = first_heading(path)
    assert page.title() == title
    assert page.locator("h1").first.inner_text().rstrip("¶").strip() == title

    # figures: one <img> per image output, each decoded (solutions' figures too, folded or not)
    images = page.eval_on_selector_all(
        ".jp-OutputArea-output img", "imgs => imgs.map(i => ({complete: i.complete, width: i.naturalWidth}))")
    assert len(images) == image_outputs(path), f"{len(images)} images on the page, {image_outputs(path)} in the notebook"
    assert all(i["complete"] and i["width"] > 0 for i in images), f"figures that did not load: {images}"

    # math: typeset where the notebook has any, with no TeX error and no TeX left as text in the prose
    typeset = page.locator("mjx-container").count()
    if has_math(path):
        assert typeset > 0, "the notebook's markdown has math, the page has no MathJax output"
    assert page.locator("mjx-merror").count() == 0, page.eval_on_selector_all(
        "mjx-merror", "es => es.map(e => e.getAttribute('data-mjx-error'))")
    prose = page.evaluate("""() => {
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: node =>
            node.parentElement.closest('.jp-RenderedMarkdown') &&
            !node.parentElement.closest('code, pre, mjx-container, script, style')
                ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_REJECT});
        const parts = [];
        while (walker.nextNode()) parts.push(walker.currentNode.textContent);
        return parts.join('');
    }""")
    leftover = MATH.findall(prose)
    assert leftover == [], f"TeX not typeset: {leftover[:5]}"

    # folded cells: solutions closed with nothing of them visible; diagrams show the figure, fold the code
    solutions, diagrams = folded(path)
    shown = page.locator("details.site-solution:not([open])").count()
    assert shown == solutions, f"{shown} folded solutions on the page, {solutions} hidden solution cells in the notebook"
    shown = page.locator("details.site-hidden-code:not([open])").count()
    assert shown == diagrams, f"{shown} folded drawing codes on the page, {diagrams} concept diagrams in the notebook"
    for k in range(solutions):
        inside = page.locator("details.site-solution").nth(k).locator(".jp-InputArea, .jp-OutputArea, .jp-RenderedMarkdown")
        assert inside.count() and not any(inside.nth(j).is_visible() for j in range(inside.count())), (
            f"solution {k + 1} shows its content before it is opened")
    for k in range(diagrams):
        cell = page.locator(".jp-Cell", has=page.locator("details.site-hidden-code")).nth(k)
        assert cell.locator(".jp-OutputArea img").first.is_visible(), (
            f"concept diagram {k + 1} shows no figure (is the notebook executed and saved with its outputs?)")
        assert not cell.locator(".jp-InputArea").first.is_visible(), "a concept diagram's code is not folded"
    if index == 0 or NOTEBOOKS[index - 1].parent != path.parent:  # the first page of each chapter
        save_screenshots(page, screenshots / path.parent.name, solutions)
    summaries = page.eval_on_selector_all("details.site-solution > summary", "s => s.map(e => e.textContent)")
    assert all(re.fullmatch(r"Solution to exercises? \d+((, | and )\d+)*", text) for text in summaries), (
        f"{summaries}: a solution cell names its exercise in its first line ('# Solution to exercise 2')")
    # widgets need a kernel: each says so in a line of text (its saved repr or raw JSON would mean nothing)
    shown = page.locator(".site-widget").count()
    assert shown == widgets(path), f"{shown} widget notes on the page, {widgets(path)} widgets in the notebook"
    if solutions:  # a click opens a solution
        page.locator("details.site-solution > summary").first.click()
        assert page.locator("details.site-solution").first.locator(".jp-InputArea, .jp-RenderedMarkdown").first.is_visible(), (
            "a click on a solution's summary does not open it")

    # navigation: index, previous and next notebook in the course's order, and every link inside the site
    assert page.locator(".site-nav-top .site-home").get_attribute("href") == "../index.html"
    for selector, neighbour in ((".site-previous", index - 1), (".site-next", index + 1)):
        links = page.locator(f".site-nav-top {selector}")
        if 0 <= neighbour < len(NOTEBOOKS):
            assert links.get_attribute("href") == "../" + href_of(NOTEBOOKS[neighbour])
        else:
            assert links.count() == 0, f"{selector} on the {'first' if neighbour < 0 else 'last'} page"
    check_links(page, base_url, checked_links)

    assert page.problems == [], page.problems

