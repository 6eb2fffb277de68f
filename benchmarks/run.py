"""Run every benchmark of the course and print its tables: `make bench` or `python benchmarks/run.py`.

Each `benchmarks/bench_<topic>.py` defines `main()`, prints its own table of measurements taken in
this one run on this one machine, and can be run alone. `--only tokenizer` runs one of them.
"""

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"{gpu}; Python {platform.python_version()}")


def main() -> None:
    topics = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=topics, action="append", help="run just these (repeatable)")
    args = parser.parse_args()
    print("machine:", describe_machine())
    for topic in args.only or topics:
        spec = importlib.util.spec_from_file_location(f"bench_{topic}", HERE / f"bench_{topic}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"\n## {topic}")
        start = time.perf_counter()
        sys.argv = [str(HERE / f"bench_{topic}.py")]  # each runs with its defaults, not run.py's options
        module.main()
        print(f"({topic} took {time.perf_counter() - start:.0f} s)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
