# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.synthgate-installed
DEMO_OUT ?= demo-output

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: setup test demo lint clean

# Reinstall only when the project's requirements change: quick when already installed.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: setup
	@rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(BIN)/synthgate ingest pneumoniamnist --out $(DEMO_OUT)/dataset
	$(BIN)/synthgate validate $(DEMO_OUT)/dataset

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
