# The two commands of the README:  `make book` (set up, then the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
# torch and torchvision builds that load together (x86_64: from this machine's disk, a CUDA build of
# about 5.5 GB that runs on the CPU too); a CPU-only machine elsewhere can take the smaller CPU builds:
#   make book TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PY     := $(VENV)/bin/python
PROFILE ?= auto

.PHONY: setup test book publish bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# unit tests, every chapter notebook under nbval (quick profile), and the built book in Chromium
test: setup
	$(PY) -m pytest -q --nbval-lax tests notebooks

# main job: run every chapter (papermill; PROFILE=auto picks the best stored results) and build the HTML
book: setup
	$(PY) -m asymlib.book --profile $(PROFILE)

# the published book (.github/workflows/pages.yml): every table from results/, never trains
SETUP ?= setup
publish: $(SETUP)
	$(PY) -m asymlib.book --stored-only

bench: setup
	$(PY) -m asymlib.bench

clean:
	rm -rf $(VENV) _build
