# Two commands for a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
# The demo's generator and matching-network training, shortened from the paper's 120,000 iterations and 60,000
# episodes so that the whole job takes minutes on a laptop CPU.
DEMO_GENERATOR_ITERATIONS ?= 3000
DEMO_MATCHING_EPISODES    ?= 2000

.PHONY: demo test test-all lint install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[pretrained,test]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded data set (scikit-learn's digits, 10 classes): train a Conv-4 on the base classes 0-4,
# extract a store of all ten classes from its checkpoint, and run the low-shot benchmark (novel classes 5-9,
# n = 1..20) with the three low-shot heads. Every step resumes or reuses what an earlier run left in $(OUT).
demo: $(VENV)/.installed
	mkdir -p $(OUT)
	$(VENV)/bin/extract train --model conv4 --dataset digits --base-classes 0-4 --val 0.2 --image-size 28 \
		--epochs 10 --batch-size 64 --optimizer adam --lr 0.002 --weight-decay 0 --schedule cosine \
		--out $(OUT)/train --resume
	$(VENV)/bin/extract --model conv4 --checkpoint $(OUT)/train/last.pt --dataset digits --image-size 28 \
		--out $(OUT)/digits.zarr
	$(VENV)/bin/featstore info $(OUT)/digits.zarr
	$(VENV)/bin/featstore search $(OUT)/digits.zarr --row 0 -k 5
	$(VENV)/bin/bench lowshot --store $(OUT)/digits.zarr --shots 1..20 --head logreg --head analogy --head matching \
		--batch-size 200 --head-option analogy.generator_iterations=$(DEMO_GENERATOR_ITERATIONS) \
		--head-option matching.episodes=$(DEMO_MATCHING_EPISODES) --out $(OUT)/lowshot
	cat $(OUT)/lowshot/lowshot.md

# The test suite without the long runs (`make test-all` includes them), after the two static checks: ruff (the
# rule set in pyproject.toml) and import-linter (the arrows of docs/architecture.md).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out *.egg-info
