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

.PHONY: book test bench venv clean-book clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(TXV_PIN)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

book: $(STAMP)
	$(BIN)/cxpmrg book

test: $(STAMP)
	$(BIN)/python -m pytest -q

# mambapy (a pure-PyTorch Mamba) is only the scan benchmark's baseline: installed here, not a dependency.
MAMBAPY_PIN := mambapy==1.2.0

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(MAMBAPY_PIN)
	$(BIN)/python -m pytest -q -m benchmark -s benchmarks

clean-book:
	rm -rf book/_build book/notebooks

clean: clean-book
	rm -rf $(VENV) runs
