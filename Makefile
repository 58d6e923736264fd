# The two commands a user needs: `make run` and `make test`.
# Both create the project-local virtual environment .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Rules call `python -m medssl.<stage>`: the venv's python must come first.
export PATH := $(BIN):$(PATH)
CORES ?= all

.PHONY: all install run report test lint format dry-run clean

all: run

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	snakemake --cores $(CORES)

report: run
	snakemake --cores $(CORES) --report results/report.html

dry-run: install
	snakemake --cores $(CORES) --dry-run

test: install
	pytest

lint: install
	ruff check src tests bench
	ruff format --check src tests bench
	snakefmt --check Snakefile workflow
	snakemake --lint

format: install
	ruff format src tests bench
	ruff check --fix src tests bench
	snakefmt Snakefile workflow

clean:
	rm -rf results logs benchmarks .snakemake
