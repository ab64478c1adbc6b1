# Developer commands. The Python is the environment ./run.sh builds (bench/python.sh finds it, building it
# if needed); override with `make bench PYTHON=/path/to/python`.

PYTHON ?= $(shell bash bench/python.sh)
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRANSFORMERS_VERBOSITY := error
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: bench bench-quick bench-report

## bench: run every benchmark; writes bench/results.json and docs/benchmarks.md (about an hour)
bench:
	$(PYTHON) bench/run_all.py

## bench-quick: a smoke run of every benchmark, written to a temporary folder (a few minutes)
bench-quick:
	$(PYTHON) bench/run_all.py --quick

## bench-report: re-render docs/benchmarks.md from bench/results.json
bench-report:
	$(PYTHON) bench/report.py
