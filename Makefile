# The two commands of the README. Each creates .venv and installs the package on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast benchmark clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,npu,onnx]'
	touch $(STAMP)

demo: $(STAMP)  ## train LeNet-5 on the shipped MNIST, convert, verify, print the report
	$(VENV)/bin/tfcompress demo $(ARGS)

test: $(STAMP)  ## the whole test suite, slow cases included (what CI runs)
	$(VENV)/bin/python -m pytest -q -rs -n 2 $(ARGS)

test-fast: $(STAMP)  ## skip the slow cases
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" $(ARGS)

benchmark: $(STAMP)  ## the convert benchmark: prints a table, writes artefacts/benchmark_convert.json
	$(VENV)/bin/tfcompress benchmark_convert $(ARGS)

clean:
	rm -rf $(VENV) artefacts .pytest_cache
