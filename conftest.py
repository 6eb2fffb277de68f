"""pytest settings for nbval, shared by `make test` and CI.

- stderr is not compared: it carries warnings with per-run temporary paths and progress-bar rates.
  Everything a notebook wants checked it prints to stdout or returns as a value.
- nbval waits 5 s for each output message; a busy 2-core machine needs longer.
"""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 60
