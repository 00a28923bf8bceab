# The two commands: `make demo` and `make test`. Both install what is missing first.
# Checks while developing (DEVELOPERS.md): `make lint`, `make test-fast` (skips the tests marked slow).
# Environments are virtualenvs built from envs/*.yaml (cached in ~/.cache/segrefine/venvs,
# keyed by each file's content); on HPC with conda use `snakemake --sdm conda` instead.
PYTHON ?= python3
# the frameworks' envs come from their registry (FRAMEWORKS in workflow_scripts/segrefine/models/__init__.py)
FRAMEWORK_ENVS := $(shell PYTHONPATH=workflow_scripts $(PYTHON) -c 'from segrefine.models import framework_envs; print(*framework_envs())')
# every env; lint is the style checks' (snakefmt)
ENVS := core $(filter-out core,$(FRAMEWORK_ENVS)) gef stereopy anndata spatialdata lint
ENV_TOOL := $(PYTHON) workflow_scripts/segrefine/envs.py
CORE_PY = $$($(ENV_TOOL) python core)
RUN_CORE = PYTHONPATH=workflow_scripts $(CORE_PY)
SNAKEMAKE = $(RUN_CORE) -m snakemake
PYTEST_ARGS ?=

.PHONY: setup setup-slurm demo demo-data test test-fast lint dag clean-demo print-envs

setup:
	@$(ENV_TOOL) build $(ENVS)

print-envs:
	@echo $(ENVS)

# slurm-wlm + munge for the SLURM tests (apt-get as root, only when missing); see docs/cluster.md
setup-slurm:
	@.ci/setup-slurm

demo/demo.json: workflow_scripts/segrefine/demo.py
	@$(ENV_TOOL) build core
	$(RUN_CORE) -m segrefine demo-data --out demo

demo-data: demo/demo.json

demo: setup demo-data
	$(SNAKEMAKE) --profile profiles/local
	@echo
	@echo "Results (see docs/outputs.md):"
	@echo "  evaluation before/after fine-tuning: results/evaluation/summary.csv"
	@cat results/evaluation/summary.csv
	@echo "  fine-tuned model + loss curve:       results/models/*/finetuned/"
	@echo "  whole-slide labels + cell table:     results/segmentation/*/"
	@echo "  cgef + AnnData:                      results/expression/*/"

test: setup
	$(RUN_CORE) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(RUN_CORE) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# ruff's rules and snakefmt's settings are in pyproject.toml; snakemake --lint reads the workflow with the demo config
lint: setup demo-data
	$(RUN_CORE) -m ruff check workflow_scripts bench tests
	$$($(ENV_TOOL) python lint) -m snakefmt --check Snakefile rules
	$(SNAKEMAKE) --lint

dag: setup demo-data
	$(SNAKEMAKE) --rulegraph | dot -Tpng > docs/rulegraph.png

clean-demo:
	rm -rf demo results logs benchmarks .snakemake
