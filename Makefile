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
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The report test renders the HTML report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

clean-venv:
	rm -rf $(VENV)
