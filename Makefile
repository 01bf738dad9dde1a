# Every target creates the environment it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build that lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: venv run test lint docs clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	# The pin goes in the same command: peft's dependencies must never replace the CPU torch.
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e '.[dev,finetune,plots,integrations]'
	touch $@

run: venv  ## the main job: CNN2 on MNIST through a 2048-number latent, one epoch
	$(VENV)/bin/mapnet train

test: venv  ## lint, then the test suite
	$(VENV)/bin/ruff check src tests docs/examples
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests docs/examples
	$(VENV)/bin/ruff format --check src tests docs/examples

docs: venv  ## the generated docs: docs/results/README.md and README.md's table, docs/api.md
	$(VENV)/bin/mapnet repro index > /dev/null
	$(PY) -m mapnet_experiments.apidocs

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
