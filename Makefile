# The two commands the README opens with: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrapped
# Where `make demo` keeps its files and the state of the demo fleet it leaves running.
DEMO_DIR ?= .demo

.PHONY: demo demo-down test unit integration sanity lint bench clean

$(STAMP): scripts/bootstrap.sh pyproject.toml requirements/runtime.txt requirements/test.txt requirements/ansible-2.18.txt
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

# The tour, then the demo fleet stays up (a supervisor process owns it) until `make demo-down`.
demo: $(STAMP)
	$(PY) -m demo --keep --dir $(DEMO_DIR)

# No bootstrap first: without the virtualenv no demo fleet can have been started from here.
demo-down:
	@if [ -x $(PY) ]; then $(PY) -m demo --down --dir $(DEMO_DIR); \
	else echo "demo-down: no $(PY) here, so no demo fleet was started from this checkout"; fi

test: $(STAMP)
	$(VENV)/bin/pytest
	$(MAKE) --no-print-directory sanity lint

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

integration: $(STAMP)
	$(VENV)/bin/pytest tests/integration

sanity: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/sanity.sh

lint: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/lint.sh

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/bench.txt
	$(PY) -m bench

# A demo fleet still up is stopped first: its files are about to go.
clean: demo-down
	rm -rf $(VENV) .venv-2.18 .pytest_cache tests/output bench/results $(DEMO_DIR)
