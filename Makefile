# The two commands the README opens with: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrapped

.PHONY: demo test unit integration sanity lint bench clean

$(STAMP): scripts/bootstrap.sh pyproject.toml requirements/runtime.txt requirements/test.txt requirements/ansible-2.18.txt
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

demo: $(STAMP)
	$(PY) -m demo

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

clean:
	rm -rf $(VENV) .venv-2.18 .pytest_cache tests/output bench/results .demo
