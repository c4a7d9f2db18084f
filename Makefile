# Developer and CI entry points. `make` (or `make help`) lists the targets.
# Works from any clone: every path is under $(CURDIR).

PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
# Touched after a successful install; inside .venv, so removing .venv removes it too.
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-kernel bench lint clean

help: ## list the targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

install: $(INSTALLED) ## create .venv and install modwatch with its dev tools (quick when up to date)

# editable_mode=compat: a .pth line with the checkout's path. The default mode installs an
# import hook whose own imports cost every interpreter start 0.45 s in an emulated guest
# (and made a bare `python3 -c pass` there look 1.6 times slower than it is).
$(INSTALLED): $(CURDIR)/pyproject.toml $(CURDIR)/Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '$(CURDIR)[dev]' --config-settings editable_mode=compat
	touch $@

demo: install ## modwatch capturing real module loads (here if this kernel can, else in a guest kernel)
	$(CURDIR)/scripts/demo.sh

test: install ## unit tests on the host, then kernel tests in each guest kernel
	$(MAKE) -C $(CURDIR) test-unit
	$(MAKE) -C $(CURDIR) test-kernel

test-unit: install ## unit tests on the host
	cd $(CURDIR) && $(BIN)/pytest -m "not kernel" tests/unit

test-kernel: install ## kernel tests in guest kernels (KERNELS=6.1 or 6.12 for one; SOAK=10000 for the full soak)
	cd $(CURDIR) && $(BIN)/python scripts/testbed.py run $(if $(SOAK),-- --soak-cycles=$(SOAK))

bench: install ## readers side by side under a storm of module syscalls, in a guest (figures, not a test)
	cd $(CURDIR) && $(BIN)/python scripts/bench.py

lint: install ## ruff check, ruff format --check, mypy --strict
	cd $(CURDIR) && $(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean: ## remove build output and tool caches (keeps .venv and the test bed's kernel cache)
	cd $(CURDIR) && rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find $(CURDIR) -path $(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf $(CURDIR)/.cache/testbed/runs $(CURDIR)/.cache/testbed/build
