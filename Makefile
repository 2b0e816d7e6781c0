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

# The whole release flow on PneumoniaMNIST with the defaults of ReleaseConfig (CPU demo settings) and
# auto-approval. Stage artifacts in $(DEMO_OUT)/work are cached by content hash, so a rerun reuses them.
demo: setup
	@mkdir -p $(DEMO_OUT)
	@test -f $(DEMO_OUT)/keys/release.key || $(BIN)/synthgate keys generate --out $(DEMO_OUT)/keys
	@rm -rf $(DEMO_OUT)/releases
	$(BIN)/synthgate release --auto-approve
	@echo
	@echo "Serve the release to researchers (token-gated downloads, on loopback):"
	@echo "  $(BIN)/synthgate tokens create --releases $(DEMO_OUT)/releases --name alice --expires 30d"
	@echo "  $(BIN)/synthgate serve --releases $(DEMO_OUT)/releases --key $(DEMO_OUT)/keys/release.pub"
	@echo "  $(BIN)/synthgate fetch http://127.0.0.1:8000/releases/<release-id> --token <token> \\"
	@echo "      --out downloaded --key $(DEMO_OUT)/keys/release.pub --accept-terms"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
