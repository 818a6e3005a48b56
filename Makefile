# Two commands a user needs: `make serve` and `make test`. Everything else is underneath.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONPATH := $(CURDIR)

PORT ?= 3000

.PHONY: setup tools train convert models serve test test-unit bench soak audit clean-models

setup: $(VENV)/.installed  ## virtual environment with the pinned dependencies

$(VENV)/.installed: requirements.txt deploy/bento_setup.sh
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt || { echo "error: pip could not install requirements.txt (see above)" >&2; exit 1; }
	VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" sh deploy/bento_setup.sh || { echo "error: deploy/bento_setup.sh could not install its pins (see above)" >&2; exit 1; }
	@touch $@

tools:  ## wrk and h2load, the load generators of the benchmarks (HTTP/1.1 and gRPC), PostgreSQL for the store tests, Java 17 for Spark batch, Chromium and promtool for the monitoring tests, HAProxy and Prometheus for the fleet, Redis for the shared prediction cache, kubectl (kustomize) for the manifests (Debian packages; need root or sudo)
	@command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }; } \
	  || echo "warning: could not install wrk; the benchmark smoke test will be skipped" >&2
	@command -v h2load >/dev/null || { apt-get install -y -q nghttp2-client >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q nghttp2-client >/dev/null; }; } \
	  || echo "warning: could not install nghttp2-client (h2load); the benchmark's gRPC scenario will be skipped" >&2
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q postgresql >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }; } \
	  || echo "warning: could not install postgresql; the experiment store tests on PostgreSQL will fail" >&2
	@command -v chromium >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } \
	  || echo "warning: could not install chromium; the dashboard browser test will fail" >&2
	@command -v promtool >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; } \
	  || echo "warning: could not install prometheus (promtool); the alert rules test will fail" >&2
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q haproxy >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q haproxy >/dev/null; }; } \
	  || echo "warning: could not install haproxy; the fleet (python -m harness.fleet) and its tests will fail" >&2
	@command -v redis-server >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }; } \
	  || echo "warning: could not install redis-server; the prediction cache's Redis test will fail" >&2
	@command -v kubectl >/dev/null || command -v kustomize >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q kubernetes-client >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q kubernetes-client >/dev/null; }; } \
	  || echo "warning: could not install kubernetes-client (kubectl); the rendered Kubernetes manifests test will fail" >&2
	@command -v java >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q openjdk-17-jre-headless >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q openjdk-17-jre-headless >/dev/null; }; } \
	  || echo "warning: could not install Java 17; the Spark batch tests (python -m batch.spark) will fail" >&2

train: setup  ## train every model missing from the store ($(BENTOML_HOME))
	$(PY) -m training

convert: train  ## ONNX and INT8 twins of every stored model that has none yet
	$(PY) -m conversion

models: convert

serve: models  ## set up, train and convert what is missing, then serve on $(PORT)
	$(VENV)/bin/bentoml serve service:Bundle --port $(PORT)

bench: models tools  ## every benchmark, over an hour: bench/results/<date>/report.md and PNG plots
	$(PY) -m bench

soak: models  ## capacity search, then 5 minutes at 80% of it: no lost request, flat memory
	$(PY) -m bench.soak

audit:  ## known vulnerabilities in the exact pins (pip-audit in a venv of its own, needs PyPI's JSON API)
	@test -x .venv-audit/bin/pip-audit || { $(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install --quiet pip-audit; }
	.venv-audit/bin/pip-audit -r requirements.txt --no-deps --disable-pip

test: setup tools  ## both suites, tests/unit and tests/e2e; .ci/run calls exactly this (pytest's "no tests collected", exit 5, is not a failure)
	@rc=0; $(PY) -m pytest tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-unit: setup  ## tests/unit alone: in process, seconds, no trained store and no server
	$(PY) -m pytest tests/unit

clean-models:
	rm -rf $(BENTOML_HOME)
