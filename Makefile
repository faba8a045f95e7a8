# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing and installs what it
# needs: torch first and pinned (a CPU build here; an unpinned torch would pull a multi-GB CUDA build), then the
# package. Override e.g. `make test TORCH=torch==2.11.0` or `make demo DEMO_ARGS="--steps 2000"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0
PERCEIVER_IO ?= perceiver-io==0.11.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: test demo lint clean venv FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Checked on every run (FORCE) but rewritten only when the pins differ from the ones installed: `make test
# TORCH=...` on an existing .venv installs that torch, and the installs below it follow (their stamps are older).
$(CONSTRAINTS): $(BIN)/python FORCE
	@if [ "$$(cat $@ 2>/dev/null)" != "$$(printf '%s\n%s' '$(TORCH)' '$(TRITON)')" ]; then \
		echo "$(PIP) install --quiet \"$(TORCH)\""; \
		$(PIP) install --quiet "$(TORCH)" && printf '%s\n%s\n' '$(TORCH)' '$(TRITON)' > $@; \
	fi

# Runtime install: the package with the data extra (datasets, tokenizers) for the demo.
$(VENV)/.base-installed: $(CONSTRAINTS) pyproject.toml setup.py
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[data]"
	touch $@

# Test install: test tools, Triton (its interpreter runs the kernels on CPU), and the perceiver-io parity stack,
# which declares Python < 3.11 and so cannot be a package extra.
$(VENV)/.test-installed: $(VENV)/.base-installed requirements/parity.txt
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[data,test,triton]"
	$(PIP) install --quiet --no-deps --ignore-requires-python "$(PERCEIVER_IO)"
	$(PIP) install --quiet --no-deps fairscale==0.4.13
	$(PIP) install --quiet -c $(CONSTRAINTS) -r requirements/parity.txt
	touch $@

venv: $(VENV)/.test-installed

test: $(VENV)/.test-installed
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.base-installed
	HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $(BIN)/perceiver-fast demo $(DEMO_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
