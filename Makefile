# Two commands do all the set-up on a fresh machine:  make demo  and  make test
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTHON ?= python3
STAMP   = $(VENV)/.installed

.PHONY: demo test venv data bench clean

venv: $(STAMP)

# torch first, pinned: served from local disk here, and the CUDA build works on CPU-only machines
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST for the embedded demo backbone (Debian package dataset-fashion-mnist)
data:
	@bash scripts/ensure-fashion-mnist.sh

demo: venv data
	$(VENV)/bin/robustprompt demo

test: venv data
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/attack_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
