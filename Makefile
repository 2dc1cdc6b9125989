# Everything a fresh machine needs: `make run` (main job) and `make test` (the suite).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of torch is installed first and exactly, so nothing later pulls CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-compat bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m vlmplug.cli run

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m pytest tests -x -p no:cacheprovider

# The same suite against the oldest supported transformers (installed beside, not into, the venv).
COMPAT_TF ?= 5.17.0
COMPAT_DIR := .compat/transformers-$(COMPAT_TF)
$(COMPAT_DIR)/.ok: $(STAMP)
	$(VPY) -m pip install -q --target $(COMPAT_DIR) "transformers==$(COMPAT_TF)" "huggingface-hub>=1.5,<2" httpx
	touch $@

test-compat: $(COMPAT_DIR)/.ok
	PYTHONPATH=$(COMPAT_DIR) HF_HUB_OFFLINE=1 $(VPY) -m pytest tests -x -p no:cacheprovider

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) eval/bench_backend.py

clean:
	rm -rf $(VENV) .compat build *.egg-info
