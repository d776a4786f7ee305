# make test  — create .venv when missing, install the project with its extras, run the correctness suite
# make bench — the default sweep for this machine (gpu where CUDA is present, quick otherwise), then the report
#
# On a machine whose own Python already has torch (the GPU machines, no package index):
#   make bench PYTHON=python3        uses that interpreter and skips the venv.

BOOTSTRAP_PYTHON ?= python3
VENV := .venv

ifeq ($(origin PYTHON), command line)
DEPS :=
else
PYTHON := $(VENV)/bin/python
DEPS := $(VENV)/.installed
endif

SWEEP ?= default
RUN ?= results/$(shell date +%Y%m%d)-$(SWEEP)

.PHONY: test bench report benchmark-save benchmark-compare clean-venv

EXTRAS ?= zoo,backpack,reference,dev

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

test: $(DEPS)
	NTKBENCH_REQUIRE_REFERENCE=1 $(PYTHON) -m pytest -p no:cacheprovider --timeout=900 -q tests

bench: $(DEPS)
	$(PYTHON) -m ntk_bench run --sweep $(SWEEP) --out $(RUN) --resume
	$(PYTHON) -m ntk_bench report $(RUN)

report: $(DEPS)
	$(PYTHON) -m ntk_bench report $(RUN)

clean-venv:
	rm -rf $(VENV)

# Regression gate (pytest-benchmark; not part of make test).
benchmark-save: $(DEPS)
	$(PYTHON) -m pytest benchmarks -q --benchmark-only --benchmark-save=baseline

BENCHMARK_TOLERANCE ?= 20%
benchmark-compare: $(DEPS)
	$(PYTHON) -m pytest benchmarks -q --benchmark-only --benchmark-compare --benchmark-compare-fail=median:$(BENCHMARK_TOLERANCE)
