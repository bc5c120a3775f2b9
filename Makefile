# Quick start: `make run` (dashboard on .demo-root/, a git-ignored copy of the bundled demo registry that
# scripts/demo_root.py seeds from configs/ and demo/ on first run; the checkout itself is never served; `make clean`
# removes it) and `make test` (the whole suite: browser, e2e and slow tests included; what CI runs). `make test-fast`
# is the lane to run while editing: every module's tests except those marked browser (headless Chromium), e2e (the
# real inference backend) and slow (crash sweeps, SIGKILL loops, memory ceilings), spread over one pytest-xdist
# worker per core.
# Both bootstrap uv (python3 -m pip install uv) when it is missing, and install the optional `fleet` extra (Ray):
# the fleet tests (marker fleet, real multi-node Ray clusters on loopback) run in make test and never skip in CI;
# make test-fast leaves them out (several Ray clusters beside xdist workers on 2 cores is too much).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PORT ?= 8501

.PHONY: run test test-fast bootstrap lint bench clean check-wheel

bootstrap:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --frozen --quiet --extra fleet

run: bootstrap
	$(UV) run --frozen python scripts/demo_root.py --port $(PORT)

test: bootstrap
	$(UV) run --frozen pytest $(PYTEST_ARGS)

test-fast: bootstrap
	$(UV) run --frozen pytest -q -n auto -m "not browser and not e2e and not slow and not fleet" $(PYTEST_ARGS)

lint: bootstrap
	$(UV) run --frozen ruff check .

# The wheel alone, in a fresh venv outside the checkout, serves the dashboard and the API (scripts/check_wheel.py).
check-wheel: bootstrap
	$(UV) run --frozen python scripts/check_wheel.py

bench: bootstrap
	$(UV) run --frozen python bench/registry_load.py

# .demo-root is make run's demo root; the rest is what older `make run`s and CLI runs in the checkout left.
clean:
	rm -rf .demo-root .demo-root.seeding-* _staging logs state configs/model_registry.json .pytest_cache
