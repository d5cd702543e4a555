# `make demo` and `make test` each create the virtual environment when it is missing,
# installing the CPU build of torch first so that no CUDA build is ever downloaded.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow docs clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cortex build examples/quickstart.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Tests marked slow; pytest exits 5 when none is collected, which is fine here.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf site runs bench-out
