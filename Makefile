# The two entry points of the README: `make demo` (the main job) and `make test` (lint, types, tests).
# Both create ./.venv on first use, installing with constraints.txt so the CPU torch wheel is used.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: demo test install browser clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/tace-sim demo --out $(DEMO_DIR)

test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy sees the tace.* package through links (setuptools' editable finder is invisible to it).
	@mkdir -p $(VENV)/typecheck/tace && for d in common client server analysis simulation; do ln -sfn $(CURDIR)/$$d $(VENV)/typecheck/tace/$$d; done
	$(VENV)/bin/mypy
	@# The default suite in two worker processes (pytest-xdist); then, with CI set or --slow in PYTEST_ARGS, the slow
	@# end-to-end tests one at a time (they run deployments on 127.0.0.1 and wait on rounds). Exit 5 is "no test selected".
	$(VENV)/bin/pytest -n 2 -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	@if [ -n "$$CI" ] || printf ' %s ' "$(PYTEST_ARGS)" | grep -q -- ' --slow '; then \
	  echo "$(VENV)/bin/pytest -m slow --slow $(PYTEST_ARGS)"; $(VENV)/bin/pytest -m slow --slow $(PYTEST_ARGS) || [ $$? -eq 5 ]; fi

# The report test renders the HTML report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

clean-venv:
	rm -rf $(VENV)
