# Two commands are the whole set-up: `make test` and `make demo`.
# Both create or reuse .venv and install with the single constraints file.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REFS_STAMP := $(VENV)/.test-references
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: install test-references test lint demo clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 \
		| grep -v "is neither a file nor a directory" || true
	$(PY) -c "import torch, transformers, deepspeed, peft, webdataset, matplotlib, pycocoevalcap, flamingo_kit"
	touch $@

install: $(STAMP)

# Reference implementations the tests compare against (OpenFlamingo's own code). Installed
# without their dependencies, after the main install: open-flamingo pins torch==2.0.1, which
# must not replace ours. Versions come from constraints.txt.
$(REFS_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
		open-flamingo einops einops-exts 2>&1 | grep -v "is neither a file nor a directory" || true
	$(PY) -c "import einops, einops_exts, importlib.util as u; assert u.find_spec('open_flamingo')"
	touch $@

test-references: $(REFS_STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: lint test-references
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
