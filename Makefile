# make test  — create .venv when missing, install the project with its extras, run the correctness suite
# make bench — the default sweep for this machine (gpu where CUDA is present, quick otherwise; on the CPU clock
#              without CUDA: CLOCK below), then the report
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

.PHONY: test lint lint-imports bench report benchmark-save benchmark-compare clean-venv

EXTRAS ?= zoo,backpack,reference,peers,ray,slurm,testzoo,dev
PIP := $(VENV)/bin/python -m pip --quiet --disable-pip-version-check

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[$(EXTRAS)]'
	# ASDL's NTK needs asdfghjkl 0.1a5, laplace-torch 0.3 asks for 0.1a4 (whose ASDL backend we do not use)
	$(PIP) install -c constraints.txt --no-deps 'asdfghjkl==0.1a5'
	touch $@

# The layers import one way: the contracts in pyproject.toml's [tool.importlinter]. import-linter finds the modules
# on disk under the root package's folder, so it reads a folder where ntk_bench holds the top-level folders (as
# links, the way an installed wheel holds them).
PYTHON_ABS = $(if $(findstring /,$(PYTHON)),$(abspath $(PYTHON)),$(PYTHON))
lint-imports: $(DEPS)
	@d=$$(mktemp -d) && mkdir $$d/ntk_bench && \
	ln -s $(CURDIR)/ntk_bench/*.py $(CURDIR)/ntk_bench/py.typed $(CURDIR)/implementations $(CURDIR)/bench \
	      $(CURDIR)/reference $$d/ntk_bench/ && \
	(cd $$d && $(PYTHON_ABS) -c 'import sys; from importlinter.cli import lint_imports_command; \
	    sys.argv[0] = "lint-imports"; sys.exit(lint_imports_command())' --no-cache $(CURDIR)/pyproject.toml); \
	rc=$$?; rm -rf $$d; exit $$rc

# Style, in seconds (pyproject.toml's [tool.ruff] and [tool.mypy]; tests/integration/test_style.py runs the same checks):
# pyflakes and the import order everywhere (`ruff check --fix .` sorts imports), docstrings on the public names of
# the files listed in fully_documented.txt, the layers' imports and no import cycle (scripts/import_cycles.py), the
# types of implementations/core and structured (mypy, through scripts/typecheck.py: the package as installed). mypy keeps its cache in .mypy_cache: its first run reads torch's
# annotations (a quarter of a minute of CPU), later runs take a second or two.
lint: $(DEPS) lint-imports
	$(PYTHON) -m ruff check --quiet --output-format concise .
	@for f in $$(cat fully_documented.txt); do test -f "$$f" || { echo "fully_documented.txt: no file $$f"; exit 1; }; done
	$(PYTHON) -m ruff check --quiet --output-format concise --config 'lint.per-file-ignores = {}' --extend-ignore F,I $$(cat fully_documented.txt)
	$(PYTHON) scripts/typecheck.py
	$(PYTHON) scripts/import_cycles.py

# make test runs the style checks first (lint runs lint-imports too)
test: lint

test: $(DEPS) lint-imports
	NTK_BENCH_REQUIRE_REFERENCE=1 $(PYTHON) -m pytest -p no:cacheprovider --timeout=900 -q -n auto --dist worksteal --durations=15 -m "not serial" tests
	NTK_BENCH_REQUIRE_REFERENCE=1 $(PYTHON) -m pytest -p no:cacheprovider --timeout=900 -q -m serial tests

# CLOCK: auto (default) times on the process's CPU time with one torch thread where there is no CUDA device (a
# shared CPU runner: on the wall clock two threads on cores others hold measure their waiting), the wall clock where
# CUDA is present; CLOCK=wall or CLOCK=cpu to choose. BENCH_ARGS: more options of `ntk-bench run`.
CLOCK ?= auto
BENCH_ARGS ?=
bench: $(DEPS)
	$(PYTHON) -m ntk_bench run --sweep $(SWEEP) --out $(RUN) --resume --clock $(CLOCK) $(BENCH_ARGS)
	$(PYTHON) -m ntk_bench report $(RUN)

report: $(DEPS)
	$(PYTHON) -m ntk_bench report $(RUN)

clean-venv:
	rm -rf $(VENV)

# Regression gate (not part of make test): benchmarks/regression.py (the package's timer, ntk_bench.bench.measurement.gate)
# times the small fixed sweep benchmarks/regression.toml (process CPU time, one thread, blocks pooled from 3 fresh
# processes), then `compare --strict` fails when a case is slower by more than BENCHMARK_FAIL_ABOVE beyond its
# noise band, when a case that was ok is not, or when a case could not be judged. On a GPU machine:
# BENCHMARK_ARGS="--device cuda".
BENCHMARK_DIR ?= .benchmarks
BENCHMARK_FAIL_ABOVE ?= 1.10
BENCHMARK_ARGS ?=
benchmark-save: $(DEPS)
	rm -rf $(BENCHMARK_DIR)/baseline
	$(PYTHON) benchmarks/regression.py --out $(BENCHMARK_DIR)/baseline $(BENCHMARK_ARGS)

benchmark-compare: $(DEPS)
	@test -f $(BENCHMARK_DIR)/baseline/results.jsonl || { echo "no baseline in $(BENCHMARK_DIR)/baseline: run make benchmark-save on the baseline code first"; exit 2; }
	rm -rf $(BENCHMARK_DIR)/current
	$(PYTHON) benchmarks/regression.py --out $(BENCHMARK_DIR)/current $(BENCHMARK_ARGS)
	$(PYTHON) -m ntk_bench.bench.output.compare $(BENCHMARK_DIR)/baseline $(BENCHMARK_DIR)/current --fail-above $(BENCHMARK_FAIL_ABOVE) --strict --out $(BENCHMARK_DIR)/compare --quiet
