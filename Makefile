# Two commands, each doing its own set-up in ./.venv:
#   make demo   - train the embedded tiny reasoning recipe on the CPU (no downloads)
#   make test   - install the test dependencies and run the test suite
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch; on a GPU machine install the CUDA build first (see README) and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/lowres-reft run recipes/tiny-reasoning.toml --set log.run_name=tiny-reasoning-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest -q
