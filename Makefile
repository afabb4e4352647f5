# The two commands of the README: `make book` (the main job) and `make test`.
# Both create .venv when it is missing; nothing else needs installing by hand
# (Java for METEOR is checked and explained by the metric code; see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The exact tested environment (pip freeze of it); pyproject.toml declares the ranges. Every install
# below goes through it, so a fresh machine gets what the tests passed with.
CONSTRAINTS := constraints.txt
PIP := $(BIN)/python -m pip
# pip warns once per package that a machine-level extra index (pip.conf) lacks ("Location ... is ignored:
# it is neither a file nor a directory"): that line, and nothing else, is filtered from pip's output.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIPQ = 2>&1 | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
DATASET ?= runs/data/phantom
export PYTHONHASHSEED := 0

.PHONY: book test bench venv browser clean-book clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "venv: pip, torch, cxpmrg_lib[dev], torchxrayvision (versions of $(CONSTRAINTS))"
	@$(PIP) install --quiet --upgrade pip $(PIPQ)
	@$(PIP) install --quiet -c $(CONSTRAINTS) torch $(PIPQ)
	@# setuptools warns at every editable build that a folder named like the package may shadow it: this
	@# checkout is that folder, on purpose (that one warning, by its text)
	@PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]' $(PIPQ)
	@# torchxrayvision (the `iu` extra) carries the real IU X-Ray reports (NLMCXR_reports.tgz) as package
	@# data; --no-deps because its torchvision dependency does not import beside the CPU torch
	@$(PIP) install --quiet --no-deps -c $(CONSTRAINTS) torchxrayvision $(PIPQ)
	@# the compiled CPU selective scan, built once per machine into torch's extension cache (without a
	@# C++ compiler it logs what to install and the pure-PyTorch scan runs: same results, slower)
	$(BIN)/python -m cxpmrg_lib.models.ssm_build --allow-missing
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# mambapy (a pure-PyTorch Mamba, the `baselines` extra) is only a baseline of the scan measurements (the
# efficiency chapter, `make bench`): installed here, --no-deps (it needs only torch).
MAMBAPY := $(PIP) install --quiet --no-deps -c $(CONSTRAINTS) mambapy $(PIPQ)

# SEEDS=N: training seeds per benchmark row (the notebooks' default is 3; `make book SEEDS=1` is the quick book)
book: $(STAMP)
	@$(BIN)/python -c "import mambapy" 2>/dev/null || $(MAMBAPY)
	$(BIN)/cxpmrg book $(if $(SEEDS),-p seeds $(SEEDS))

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Headless Chromium for the browser check of the built book (tests/test_browser.py). Debian's packages;
# installing needs root: without it the browser test skips and says why (CI sets CI_REQUIRE_BROWSER=1,
# which turns the skip into a failure).
BROWSER_PKGS := chromium
browser:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS) >/dev/null) || \
		echo "*** Chromium is not installed and could not be installed (needs Debian apt-get as root): the browser check will be skipped ***"

bench: $(STAMP)
	@$(MAMBAPY)
	$(BIN)/python -m pytest -q -m benchmark -s benchmarks

clean-book:
	rm -rf book/_build book/notebooks

clean: clean-book
	rm -rf $(VENV) runs
