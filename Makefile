# Strait developer entry points. `make test` is what CI (.ci/run) runs.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/strait/target
VENV ?= $(HOME)/.cache/strait/venv
PYTHON := $(VENV)/bin/python
export STRAIT_TANSU_BIN ?= $(HOME)/.cache/strait/tools/bin/tansu
PYTEST_ARGS ?=

.PHONY: all setup build test pytest demo bench bench-features lint fmt

all: build

setup:
	scripts/setup.sh

build:
	cargo build --workspace --bins

test: setup build
	cargo test --workspace
	$(PYTHON) -m pytest integration/ $(PYTEST_ARGS)

# Only the Python scenarios (assumes setup and build were done).
pytest:
	$(PYTHON) -m pytest integration/ $(PYTEST_ARGS)

demo: setup build
	scripts/demo.sh

bench: setup
	cargo build --release -p strait-loadgen
	if [ -f edge/Cargo.toml ]; then cargo build --release -p strait-edge; fi
	$(PYTHON) integration/bench/run.py

# What mTLS, authorization and encryption cost at the edge (64 producer connections, 1 KB records).
bench-features: setup
	cargo build --release -p strait-loadgen -p strait-edge -p strait-testcerts
	cargo build -p strait-testcerts
	$(PYTHON) integration/bench/features.py

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all
