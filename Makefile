# slimkit: `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := models/digits_resnet20.pt
DEMO_KE := models/digits_resnet20_ke.pt

.PHONY: venv demo test test-fast clean

venv: $(VENV)/.installed

# Re-installs only when pyproject.toml changes. torch/torchvision are pinned in pyproject.toml so
# they come from local disk on the project's machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,timm]'
	touch $@

demo: venv
	@mkdir -p .demo
	$(BIN)/slimkit extract --split-rate 0.5 $(DEMO) -o .demo/digits_resnet20.slim.pt --force
	$(BIN)/slimkit export .demo/digits_resnet20.slim.pt -o .demo/digits_resnet20.slim.onnx --force
	$(BIN)/slimkit compare $(DEMO) --split-rate 0.5 --data digits --batch 1,32 --out .demo/compare --force
	$(BIN)/slimkit compare $(DEMO_KE) --split-rate 0.5 --data digits --batch 1,32 --out .demo/compare_ke --force

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .demo .pytest_cache
