# Two commands a user needs: `make serve` and `make test`. Everything else is underneath.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONPATH := $(CURDIR)

.PHONY: setup train convert models serve test bench clean-models

setup: $(VENV)/.installed  ## virtual environment with the pinned dependencies

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt || { echo "error: pip could not install requirements.txt (see above)" >&2; exit 1; }
	@touch $@

train: setup  ## train every model missing from the store ($(BENTOML_HOME))
	$(PY) -m training

models: train

serve: models  ## set up, train what is missing, then serve
	@echo "models are ready in $(BENTOML_HOME); the service does not exist yet (issue: the service)"

test: setup  ## the test suite; .ci/run calls exactly this
	$(PY) -m pytest -q tests

clean-models:
	rm -rf $(BENTOML_HOME)
