# The two commands of the README: `make book` (the main job) and `make test`.
# Both create .venv when it is missing; nothing else needs installing by hand
# (Java for METEOR is checked and explained by the metric code; see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
# torchxrayvision carries the real IU X-Ray reports (NLMCXR_reports.tgz) as package
# data; --no-deps because its torchvision dependency does not import beside the CPU torch.
TXV_PIN := torchxrayvision==1.5.7
DATASET ?= runs/data/phantom
export PYTHONHASHSEED := 0

.PHONY: book test bench venv browser clean-book clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(TXV_PIN)
	@# the compiled CPU selective scan, built once per machine into torch's extension cache (without a
	@# C++ compiler it logs what to install and the pure-PyTorch scan runs: same results, slower)
	$(BIN)/python -m cxpmrg_lib.models.ssm_build --allow-missing
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# mambapy (a pure-PyTorch Mamba) is only a baseline of the scan measurements (the efficiency chapter,
# `make bench`): installed here, not a dependency.
MAMBAPY_PIN := mambapy==1.2.0

book: $(STAMP)
	@$(BIN)/python -c "import mambapy" 2>/dev/null || $(BIN)/python -m pip install --quiet --no-deps $(MAMBAPY_PIN)
	$(BIN)/cxpmrg book

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# Headless Chromium for the browser check of the built book (tests/test_browser.py). Debian's packages;
# installing needs root: without it the browser test skips and says why (CI sets CI_REQUIRE_BROWSER=1,
# which turns the skip into a failure).
BROWSER_PKGS := chromium chromium-driver
browser:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS) >/dev/null) || \
		echo "*** Chromium is not installed and could not be installed (needs Debian apt-get as root): the browser check will be skipped ***"

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(MAMBAPY_PIN)
	$(BIN)/python -m pytest -q -m benchmark -s benchmarks

clean-book:
	rm -rf book/_build book/notebooks

clean: clean-book
	rm -rf $(VENV) runs
