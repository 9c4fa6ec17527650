# Two commands, each doing its own set-up in ./.venv from the lock (requirements/lock.txt):
#   make demo   - train the embedded tiny reasoning recipe on the CPU (no downloads)
#   make test   - install the test dependencies and run the test suite
# and `make lock` refreshes the lock (the newest versions pyproject.toml's ranges allow; then run make test).
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock.txt
# torch goes first, through pip: pip's configuration finds the CPU build where one is provided locally, and the
# lock's other packages are then installed around it. On a GPU machine install the CUDA build of this version
# instead (README, "Installing for real use").
TORCH_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.9

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "error: make demo/test need Python >= 3.11 (the lock is resolved for 3.11+); run e.g. make PYTHON=python3.11 test")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c $(LOCK) "$(TORCH_SPEC)" "$(UV_SPEC)"
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python -c $(LOCK) -e ".[test]"
	touch $@

.PHONY: demo test install lock
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lowres-reft run recipes/tiny-reasoning.toml --set log.run_name=tiny-reasoning-$$(date +%Y%m%d-%H%M%S)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest -q

lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra test --extra bench --universal --python-version 3.11 \
		-c requirements/pins.txt -o $(LOCK) --custom-compile-command "make lock"
