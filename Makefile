# Two entry points: `make demo` and `make test`. Both create .venv on first use and install the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DEMO_DIR ?= runs/demo
# No model hub anywhere: every checkpoint is local. Ray's token auth is for clusters, not a local demo.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench bench-gpu clean-demo docs-pictures

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo-assets $(DEMO_DIR)
	$(BIN)/pipeline precompute --shards $(DEMO_DIR)/shards --teachers manifests/teachers/demo.yaml --store $(DEMO_DIR)/store
	$(BIN)/pipeline train --config manifests/experiments/demo.yaml
	$(BIN)/pipeline preview $(DEMO_DIR)/store --rows 0,5,9,14 --shards $(DEMO_DIR)/shards --out $(DEMO_DIR)/preview.png
	$(BIN)/pipeline probe --checkpoint $(DEMO_DIR)/checkpoint --store $(DEMO_DIR)/store --shards $(DEMO_DIR)/shards --out $(DEMO_DIR) --quiet
	$(BIN)/pipeline visualize --checkpoint $(DEMO_DIR)/checkpoint --teachers manifests/teachers/demo.yaml --image $(DEMO_DIR)/llava/images/cat/000006.jpg --out $(DEMO_DIR)/visualize.png
	@echo
	@$(BIN)/pipeline status $(DEMO_DIR)/store
	@echo "made: $(DEMO_DIR)/shards (demo data), $(DEMO_DIR)/assets (tiny checkpoints), $(DEMO_DIR)/store (targets),"
	@echo "      $(DEMO_DIR)/checkpoint (student), $(DEMO_DIR)/preview.png (targets), $(DEMO_DIR)/probe.png (layer-wise probes),"
	@echo "      $(DEMO_DIR)/visualize.png (the student's predictions decoded by the teachers' heads)"

# Two test processes: one alone keeps 2 cores about 55% busy (imports, process starts and Ray's waits are serial).
# Work stealing keeps a module's tests together (its fixtures built once) until a process runs dry.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# Speed and memory goals live here, as ratios measured side by side in one run (never in timed tests): each is the
# median of interleaved rounds with its min-max. Results and the machine they came from: benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/precompute.py
	$(BIN)/python benchmarks/feed.py
	$(BIN)/python benchmarks/host_budget.py
	$(BIN)/python benchmarks/indexing.py
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/pos_embed.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/dedup.py

# On a machine with CUDA GPUs: the paper's teachers at real size (random weights), bare forward vs pipeline rows/s.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

# The README's pictures are committed under docs/ because runs/ is git-ignored; this refreshes them from a demo run.
docs-pictures: demo
	cp $(DEMO_DIR)/preview.png $(DEMO_DIR)/probe.png $(DEMO_DIR)/visualize.png docs/

clean-demo:
	rm -rf $(DEMO_DIR)
