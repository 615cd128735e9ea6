# slimkit: `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := models/digits_resnet20.pt
DEMO_KE := models/digits_resnet20_ke.pt

.PHONY: venv demo lint test test-fast test-compat clean

venv: $(VENV)/.installed

# Re-installs only when pyproject.toml or the pins change. tools/constraints.txt pins torch and
# torchvision to the versions on the project's machines' local disk; pyproject.toml has ranges.
$(VENV)/.installed: pyproject.toml tools/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c tools/constraints.txt -e '.[test,timm]'
	touch $@

demo: venv
	@mkdir -p .demo
	$(BIN)/slimkit extract --split-rate 0.5 $(DEMO) -o .demo/digits_resnet20.slim.pt --force
	$(BIN)/slimkit export .demo/digits_resnet20.slim.pt -o .demo/digits_resnet20.slim.onnx --force
	$(BIN)/slimkit compare $(DEMO) --split-rate 0.5 --data digits --batch 1,32 --out .demo/compare --force
	$(BIN)/slimkit compare $(DEMO_KE) --split-rate 0.5 --data digits --batch 1,32 --out .demo/compare_ke --force

# Equalities between different computations (slim vs masked, merged vs mean of teachers, ONNX vs
# torch, DEN's old tasks) are run a second time on one thread: they must hold for any reduction order.
INVARIANTS := tests/test_surgery.py tests/test_plan.py tests/test_checkpoint.py tests/test_export.py \
              tests/test_merge.py tests/test_den.py

# The linter's rule set is in pyproject.toml ([tool.ruff]); `make test` stops on any finding.
lint: venv
	$(BIN)/ruff check slimkit tests benchmarks tools

test: lint
	SLIMKIT_TEST_THREADS=2 $(BIN)/python -m pytest -q
	SLIMKIT_TEST_THREADS=1 $(BIN)/python -m pytest -q $(INVARIANTS)

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# Another supported torch: a fresh venv with torch 2.13.0 and torchvision 0.28.0 from the registry
# (--isolated: not this machine's local 2.14.1 disk index, whose 2.13.0+cpu torch does not match the
# registry's torchvision binaries), then `pip install .`, which must keep that torch; then the fast
# tests. About 2 minutes of downloads (~4 GB) and 5 of tests.
COMPAT := .venv-compat
test-compat:
	rm -rf $(COMPAT) && $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install --quiet --isolated 'torch==2.13.0' 'torchvision==0.28.0'
	$(COMPAT)/bin/pip install --quiet '.[test]'
	$(COMPAT)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('kept torch', torch.__version__)"
	cd tests && ../$(COMPAT)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

clean:
	rm -rf $(VENV) $(COMPAT) .demo .pytest_cache
