# The two commands of the README:  `make book` (set up, then the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PROFILE ?= quick

.PHONY: setup test book bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q

# main job: the report's Table 1 in the chosen profile (quick: a minute; cpu: ~1 h; full: GPU)
book: setup
	$(PY) -m asymlib table table1 --profile $(PROFILE)

bench: setup
	$(PY) -m asymlib.bench

clean:
	rm -rf $(VENV) _build
