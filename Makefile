# The two commands of the README:  `make book` (set up, then the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PROFILE ?= auto

.PHONY: setup test book bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# unit tests, every chapter notebook under nbval (quick profile), and the built book in Chromium
test: setup
	$(PY) -m pytest -q --nbval-lax tests notebooks

# main job: run every chapter (papermill; PROFILE=auto picks the best stored results) and build the HTML
book: setup
	$(PY) -m asymlib.book --profile $(PROFILE)

bench: setup
	$(PY) -m asymlib.bench

clean:
	rm -rf $(VENV) _build
