# Everything a fresh machine needs: `make run` (main job) and `make test` (the suite).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions of everything `make test` installs; pyproject.toml keeps the ranges users get.
LOCK := requirements/lock.txt
# The CPU wheel of torch is installed first and exactly, so nothing later pulls CUDA builds.
TORCH_SPEC ?= torch==2.13.0
PYTEST := HF_HUB_OFFLINE=1 $(VPY) -m pytest tests -x -p no:cacheprovider

.PHONY: install run test test-compat test-latest test-lmms lock bench clean browser

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m vlmplug.cli run

test: $(STAMP)
	$(PYTEST)

# Rewrite the lock from the venv (after a deliberate upgrade inside it).
lock: $(STAMP)
	{ sed -n '1,2p' $(LOCK); $(VPY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The same suite against the oldest supported transformers (installed beside, not into, the venv).
COMPAT_TF ?= 5.17.0
COMPAT_DIR := .compat/transformers-$(COMPAT_TF)
$(COMPAT_DIR)/.ok: $(STAMP)
	rm -rf $(COMPAT_DIR)
	$(VPY) -m pip install -q --target $(COMPAT_DIR) "transformers==$(COMPAT_TF)" "huggingface-hub>=1.5,<2" httpx
	touch $@

test-compat: $(COMPAT_DIR)/.ok
	PYTHONPATH=$(COMPAT_DIR) $(PYTEST)

# The same suite against the newest transformers the registry serves right now (beside the venv, like
# test-compat): a new release that breaks vlmplug fails here first, not in a user's hands.
test-latest: $(STAMP)
	@latest=$$($(VPY) scripts/release_train.py newest) || exit 1; \
	locked=$$($(VPY) scripts/release_train.py locked) || exit 1; \
	dir=.compat/transformers-latest-$$latest; \
	echo "newest transformers on the registry: $$latest (locked: $$locked)"; \
	if [ ! -f $$dir/.ok ]; then \
	  rm -rf $$dir; \
	  if ! $(VPY) -m pip install -q --target $$dir "transformers==$$latest"; then \
	    echo "test-latest: transformers $$latest's dependencies do not install from this registry (5.25 requires"; \
	    echo "  'kernels', which it imports lazily); installing it alone, on the venv's packages:"; \
	    rm -rf $$dir; $(VPY) -m pip install -q --no-deps --target $$dir "transformers==$$latest" || exit 1; \
	    $(VPY) scripts/release_train.py unmet $$dir; \
	  fi; \
	  touch $$dir/.ok; \
	fi; \
	PYTHONPATH=$$dir $(PYTEST)

# The lmms-eval plugin's tests with lmms-eval installed (beside the venv, like test-compat: the extra is heavy and
# `make test` skips these tests without it). lmms-eval 0.7.3, the newest on the registry, imports filelock._api,
# which filelock 4 removed: filelock 3 goes beside it. torchvision, which lmms-eval declares but the plugin's path
# never imports, has no CPU build here: --no-deps for lmms-eval itself, its imported dependencies by name.
LMMS_EVAL ?= 0.7.3
LMMS_DIR := .compat/lmms-eval-$(LMMS_EVAL)
$(LMMS_DIR)/.ok: $(STAMP)
	rm -rf $(LMMS_DIR)
	$(VPY) -m pip install -q --no-deps --target $(LMMS_DIR) "lmms-eval==$(LMMS_EVAL)" "filelock<4"
	$(VPY) -m pip install -q --target $(LMMS_DIR) -c $(LOCK) pytz loguru sacrebleu datasets evaluate tenacity pytablewriter
	rm -rf $(LMMS_DIR)/filelock-4* && $(VPY) -m pip install -q --no-deps --upgrade --target $(LMMS_DIR) "filelock<4"
	touch $@

test-lmms: $(LMMS_DIR)/.ok
	PYTHONPATH=$(LMMS_DIR) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) -m pytest tests/test_lmms_plugin.py -p no:cacheprovider -rs

# Debian's Chromium and its ChromeDriver for the demo's browser test (tests/test_demo_browser.py, which skips without
# them unless VLMPLUG_REQUIRE_BROWSER=1, as in CI). Installed from the distribution, never downloaded by a driver.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then echo "browser: $$($(CHROMIUM) --version)"; else \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver fonts-dejavu-core >/dev/null && $(CHROMIUM) --version; fi

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) eval/bench_backend.py

clean:
	rm -rf $(VENV) .compat build *.egg-info

# Mutation testing of the methods and the backend (scripts/mutation.py): each named mutation is applied to a copy of
# the tree (never this one) and its targeted tests run there; a surviving mutation fails the target. Results in
# build/mutation.json. `make mutation ARGS=--full` runs the whole suite per mutation, `ARGS="--only NAME,..."` a few.
.PHONY: mutation
mutation: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) scripts/mutation.py $(ARGS)
