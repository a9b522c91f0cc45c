# Two commands for a fresh clone:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
# The demo's settings, all shortened from the paper's so that the whole job takes about 2 minutes on 2 CPU cores:
# the low-shot classifier's SGD iterations (the paper: 10,000), the analogy generator's iterations (120,000) and the
# matching network's training episodes (60,000). On the digits' 430 base training rows, 2,000 iterations of batch
# 200 are about 460 passes over the base pool.
DEMO_ITERATIONS           ?= 2000
DEMO_GENERATOR_ITERATIONS ?= 3000
DEMO_MATCHING_EPISODES    ?= 2000
DEMO_FSOR_EPISODES        ?= 1000

.PHONY: demo test test-all lint install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[pretrained,test]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded data set (scikit-learn's digits, 10 classes): train a Conv-4 on the base classes 0-4,
# extract a store of all ten classes from its checkpoint (timed: the only pass over pixels), then train many heads
# on the cached features: the low-shot benchmark (novel classes 5-9, n = 1..20) with the three low-shot heads, and
# few-shot open-set recognition (3-way 1/5-shot episodes with 2 unknown classes, all drawn from the novel digits
# 5-9; the splits train / val are the base digits 0-2 / 3-4, class-disjoint from test and from each other). Every
# step resumes or reuses what an earlier run left in $(OUT). Thread pools follow featstore.runtime.default_threads
# (one thread for problems this small).
demo: $(VENV)/.installed
	mkdir -p $(OUT)
	$(VENV)/bin/extract train --model conv4 --dataset digits --base-classes 0-4 --val 0.2 --image-size 28 \
		--epochs 10 --batch-size 64 --optimizer adam --lr 0.002 --weight-decay 0 --schedule cosine \
		--out $(OUT)/train --resume
	@if [ ! -f $(OUT)/extract.txt ] || [ ! -d $(OUT)/digits.zarr ]; then \
		$(VENV)/bin/extract --model conv4 --checkpoint $(OUT)/train/last.pt --dataset digits --image-size 28 \
			--out $(OUT)/digits.zarr > $(OUT)/extract.log 2>&1 || { cat $(OUT)/extract.log; exit 2; }; \
		grep "rows in" $(OUT)/extract.log > $(OUT)/extract.txt; fi
	@echo "extraction (pixels -> features, once): $$(cat $(OUT)/extract.txt)"
	$(VENV)/bin/featstore info $(OUT)/digits.zarr
	$(VENV)/bin/featstore search $(OUT)/digits.zarr --row 0 -k 5
	$(VENV)/bin/bench lowshot --store $(OUT)/digits.zarr --shots 1..20 --head logreg --head analogy --head matching \
		--batch-size 200 --iterations $(DEMO_ITERATIONS) \
		--head-option analogy.generator_iterations=$(DEMO_GENERATOR_ITERATIONS) \
		--head-option matching.episodes=$(DEMO_MATCHING_EPISODES) --out $(OUT)/lowshot --quiet
	cat $(OUT)/lowshot/lowshot.md
	@for split in "test class>=5" "train class<=2" "val class>=3 & class<=4"; do \
		$(VENV)/bin/featstore split $(OUT)/digits.zarr $${split%% *} --rule "$${split#* }" --overwrite || exit 2; done
	$(VENV)/bin/bench fsor --store $(OUT)/digits.zarr --split test --train-split train --val-split val \
		--ways 3 --open-ways 2 --shots 1,5 --episodes $(DEMO_FSOR_EPISODES) --head protonet --out $(OUT)/fsor --quiet
	@echo "extraction (once): $$(cat $(OUT)/extract.txt)"
	@grep -h "^Time on the cached features" $(OUT)/lowshot/lowshot.md | sed 's/^/bench lowshot: /'

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
