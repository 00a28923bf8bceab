# The two commands: `make demo` and `make test`. Both install what is missing first.
# Checks while developing (DEVELOPERS.md): `make lint`, `make test-fast` (skips the tests marked slow or integration).
# Environments are virtualenvs built from envs/*.yaml (cached in ~/.cache/segrefine/venvs,
# keyed by each file's content); on HPC with conda use `snakemake --sdm conda` instead.
PYTHON ?= python3
# the frameworks' envs come from their registry (FRAMEWORKS in workflow_scripts/segrefine/models/__init__.py)
FRAMEWORK_ENVS := $(shell PYTHONPATH=workflow_scripts $(PYTHON) -c 'from segrefine.models import framework_envs; print(*framework_envs())')
# the envs the rules name themselves (env_file("gef"), ...): Snakemake needs each of them built to read the workflow
RULE_ENVS := core $(filter-out core,$(sort $(shell sed -n 's/.*env_file("\([a-z_]*\)").*/\1/p' rules/*.smk)))
# every env: `make setup` and `make test`; lint is the style checks' (snakefmt)
ENVS := $(RULE_ENVS) $(filter-out $(RULE_ENVS),$(FRAMEWORK_ENVS)) lint
ENV_TOOL := $(PYTHON) workflow_scripts/segrefine/envs.py
CORE_PY = $$($(ENV_TOOL) python core)
RUN_CORE = PYTHONPATH=workflow_scripts $(CORE_PY)
SNAKEMAKE = $(RUN_CORE) -m snakemake
DEMO_CONFIG := config/config.yaml
DEMO_REPORT := results/report.html
# the envs of the frameworks the demo config's models use, less the rules' (segrefine.models.config_envs; reads YAML,
# so it runs in the core env)
DEMO_FRAMEWORK_ENVS = $(RUN_CORE) -c 'import sys; from segrefine.models import config_envs; \
	print(*(e for e in config_envs(sys.argv[1]) if e not in sys.argv[2:]))' $(DEMO_CONFIG) $(RULE_ENVS)
PYTEST_ARGS ?=

.PHONY: setup setup-demo setup-slurm demo demo-data test test-fast lint dag clean-demo print-envs print-demo-envs

setup:
	@$(ENV_TOOL) build $(ENVS)

# only what the demo uses: the rules' envs and its models' frameworks' envs (not the other frameworks', nor lint)
setup-demo:
	@$(ENV_TOOL) build core
	@envs="$$($(DEMO_FRAMEWORK_ENVS))" && $(ENV_TOOL) build $(RULE_ENVS) $$envs

print-envs:
	@echo $(ENVS)

print-demo-envs:
	@envs="$$($(DEMO_FRAMEWORK_ENVS))" && echo $(RULE_ENVS) $$envs

# slurm-wlm + munge for the SLURM tests (apt-get as root, only when missing); see docs/cluster.md
setup-slurm:
	@.ci/setup-slurm

demo/demo.json: workflow_scripts/segrefine/demo.py
	@$(ENV_TOOL) build core
	$(RUN_CORE) -m segrefine demo-data --out demo

demo-data: demo/demo.json

demo: setup-demo demo-data
	$(SNAKEMAKE) --profile profiles/local
	$(SNAKEMAKE) --report $(DEMO_REPORT)
	@echo
	@echo "Results (see docs/outputs.md):"
	@echo "  HTML report (open in a browser):     $(DEMO_REPORT)"
	@echo "  evaluation before/after fine-tuning: results/evaluation/summary.csv"
	@cat results/evaluation/summary.csv
	@echo "  fine-tuned model + loss curve:       results/models/*/finetuned/"
	@echo "  whole-slide labels + cell table:     results/segmentation/*/"
	@echo "  cgef + AnnData:                      results/expression/*/"

test: setup
	$(RUN_CORE) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(RUN_CORE) -m pytest tests -m "not slow and not integration" $(PYTEST_ARGS)

# ruff's rules and format and snakefmt's settings are in pyproject.toml; snakemake --lint reads the workflow with the demo config
lint: setup-demo demo-data
	@$(ENV_TOOL) build lint
	$(RUN_CORE) -m ruff check workflow_scripts bench tests
	$(RUN_CORE) -m ruff format --check workflow_scripts bench tests
	$$($(ENV_TOOL) python lint) -m snakefmt --check Snakefile rules
	$(SNAKEMAKE) --lint

dag: setup-demo demo-data
	$(SNAKEMAKE) --rulegraph | dot -Tpng > docs/rulegraph.png

clean-demo:
	rm -rf demo results logs benchmarks .snakemake
