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
# pip's own output (resolver, build backend) goes to $(VENV)/install.log; the screen shows one line, or the log's
# tail when the install fails.
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet --quiet
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing synthgate and its dependencies into $(VENV) (the first time takes several minutes; log: $(VENV)/install.log)"
	@{ $(PIP) install --upgrade pip && $(PIP) install -e '.[dev]'; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 30 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

# Two pytest workers (CI has 2 cores), one torch thread each: two multi-threaded torch processes on the same cores
# ran 20-60x slower (OpenMP threads spinning). loadscope keeps a module's tests, and its fixtures, on one worker.
# (Exported per target, not as a command prefix: a prefix makes make run the line through sh, and the shell
# completion test then sees sh as its shell.)
TEST_WORKERS ?= 2
test: export OMP_NUM_THREADS = 1
test: export MKL_NUM_THREADS = 1
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

# The whole release flow on PneumoniaMNIST with examples/release.yaml (CPU demo settings, the example publisher
# and contact) and auto-approval. Stage artifacts in $(DEMO_OUT)/work are cached by content hash, so a rerun
# reuses them.
DEMO_CONFIG ?= examples/release.yaml
demo: setup
	@mkdir -p $(DEMO_OUT)
	@test -f $(DEMO_OUT)/keys/release.key || $(BIN)/synthgate keys generate --out $(DEMO_OUT)/keys
	@rm -rf $(DEMO_OUT)/releases
	$(BIN)/synthgate release --config $(DEMO_CONFIG) --auto-approve --workdir $(DEMO_OUT)/work \
		--releases-dir $(DEMO_OUT)/releases --key $(DEMO_OUT)/keys/release.key
	@echo
	@echo "Serve the release to researchers (token-gated downloads, on loopback):"
	@echo "  $(BIN)/synthgate tokens create --releases $(DEMO_OUT)/releases --name alice --expires 30d"
	@echo "  $(BIN)/synthgate serve --releases $(DEMO_OUT)/releases --key $(DEMO_OUT)/keys/release.pub"
	@echo "  $(BIN)/synthgate fetch http://127.0.0.1:8000/releases/<release-id> --token <token> \\"
	@echo "      --out downloaded --key $(DEMO_OUT)/keys/release.pub --accept-terms"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
