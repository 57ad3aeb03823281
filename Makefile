# Strait developer entry points. `make test` is what CI (.ci/run) runs.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/strait/target
VENV ?= $(HOME)/.cache/strait/venv
PYTHON := $(VENV)/bin/python
export STRAIT_TANSU_BIN ?= $(HOME)/.cache/strait/tools/bin/tansu
PYTEST_ARGS ?=

.PHONY: all setup build test pytest demo fuzz fuzz-smoke fuzz-corpus fuzz-report soak-rotation bench bench-features bench-compare bench-compare-smoke bench-mesh bench-mesh-smoke bench-federation bench-federation-smoke bench-memory bench-memory-smoke failover-drill soak lint fmt

all: build

setup:
	scripts/setup.sh

build:
	cargo build --workspace --bins

# What CI runs (scripts/test.sh): formatting and lints first (cheap, and they fail fast), the unit
# tests, the scenarios on Apache Kafka, the README's quick-start demo, the Tansu subset and
# fuzz-smoke. Tansu and the fuzz targets build in the background while the Kafka scenarios run.
test:
	PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test.sh

# Only the Python scenarios (assumes setup and build were done): Apache Kafka, then the Tansu subset.
pytest:
	PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test.sh scenarios

demo: setup build
	scripts/demo.sh

# The edge's 1-minute certificates renewed under produce/consume load for 5 minutes (CI runs 90 s).
ROTATION_SECONDS ?= 300
soak-rotation: setup build
	STRAIT_ROTATION_SECONDS=$(ROTATION_SECONDS) $(PYTHON) -m pytest integration/tests/test_identity.py \
		integration/tests/test_rotation.py -k rotates $(PYTEST_ARGS)

# 30 minutes of mixed load while certificates rotate, the KMS freezes, the control-plane leader is
# killed and Kafka restarts (CI runs the same scenario for 60 s). Writes integration/bench/soak.json.
SOAK_SECONDS ?= 1800
soak: setup build
	STRAIT_SOAK_SECONDS=$(SOAK_SECONDS) STRAIT_SOAK_REPORT=$(CURDIR)/integration/bench/soak.json \
		$(PYTHON) -m pytest integration/tests/test_soak.py $(PYTEST_ARGS)
	$(PYTHON) integration/bench/soak.py

bench: setup
	cargo build --release -p strait-loadgen
	if [ -f edge/Cargo.toml ]; then cargo build --release -p strait-edge; fi
	$(PYTHON) integration/bench/run.py
	$(PYTHON) integration/bench/readme.py

# What mTLS, authorization and encryption cost at the edge (64 producer connections, 1 KB records).
bench-features: setup
	cargo build --release -p strait-loadgen -p strait-edge -p strait-testcerts
	cargo build -p strait-testcerts
	$(PYTHON) integration/bench/features.py
	$(PYTHON) integration/bench/readme.py

# Apache Kafka direct vs strait-edge vs Kroxylicious vs socat, passthrough and encrypting (OpenBao), 3 rounds;
# writes integration/bench/compare.json, compare.md and the table in docs/benchmarks.md. About an hour on
# 2 cores: run it on a quiet machine. BENCH_ARGS='--rounds 5', '--rows 1000x1', '--scale 0.5', ...
BENCH_ARGS ?=
bench-compare: setup
	cargo build --release -p strait-edge -p strait-loadgen
	$(PYTHON) integration/bench/compare.py $(BENCH_ARGS)

# The same with tiny counts, one round, 1 KB / one connection; asserts delivery and ciphertext at rest
# (what integration/tests/test_bench_smoke.py runs in CI). Debug binaries from `make build`.
bench-compare-smoke: setup build
	$(PYTHON) integration/bench/compare.py --smoke --profile debug

# The cross-site path: QUIC tunnel vs TLS-over-TCP tunnel vs straight to the far edge, 3 interleaved rounds;
# writes integration/bench/mesh.json, mesh.md and the mesh block of docs/benchmarks.md. About 5 minutes.
bench-mesh: setup
	cargo build --release -p strait-edge -p strait-loadgen
	$(PYTHON) integration/bench/mesh.py $(BENCH_ARGS)

bench-mesh-smoke: setup build
	$(PYTHON) integration/bench/mesh.py --smoke

# Federation: bytes per record at rest for one and two realms, two-realm edge throughput against one,
# KMS calls per million records at each site (real Kafka, OpenBao, moto); writes integration/bench/
# federation.json, federation.md and the federation block of docs/benchmarks.md. About 5 minutes.
bench-federation: setup
	cargo build --release -p strait-edge -p strait-loadgen
	$(PYTHON) integration/bench/federation.py $(BENCH_ARGS)

# Edge RSS with 1,000 idle connections, with 100 connections announcing 100 MiB frames to an authorizing
# listener, and under load (real Kafka); writes integration/bench/memory.json, memory.md and the memory block
# of docs/benchmarks.md. A few minutes. BENCH_ARGS='--profile debug' measures the `make build` binary.
bench-memory: setup
	cargo build --release -p strait-edge
	$(PYTHON) integration/bench/memory.py $(BENCH_ARGS)

bench-memory-smoke: setup build
	$(PYTHON) integration/bench/memory.py --smoke --profile debug

bench-federation-smoke: setup
	cargo build --release -p strait-edge -p strait-loadgen
	$(PYTHON) integration/bench/federation.py --smoke

# A DR drill: two Kafka clusters, MM2, a control plane, an edge; kills the primary, fails over, prints RTO/RPO.
failover-drill: setup build
	$(PYTHON) examples/failover-drill/drill.py

# Fuzzing (docs/fuzzing.md): libFuzzer targets in edge/fuzz, built on stable with cargo-fuzz
# (installed by scripts/setup-fuzz.sh) into their own target dir. `make fuzz` runs each target
# FUZZ_RUNS executions (FUZZ_JOBS at once) and records them in edge/fuzz/results.json and the table of
# docs/fuzzing.md; `make fuzz-smoke` runs every target briefly from the checked-in seeds (CI).
FUZZ_RUNS ?= 10000000
FUZZ_JOBS ?= 1
FUZZ_TARGETS ?=
FUZZ_SECONDS ?=
fuzz:
	scripts/setup-fuzz.sh
	python3 scripts/fuzz.py run --runs $(FUZZ_RUNS) --jobs $(FUZZ_JOBS) $(if $(FUZZ_SECONDS),--seconds $(FUZZ_SECONDS)) $(FUZZ_TARGETS)

fuzz-smoke:
	scripts/setup-fuzz.sh
	python3 scripts/fuzz.py smoke

fuzz-report:
	python3 scripts/fuzz.py report

# Seeds from real traffic: confluent-kafka and kafka-python against Apache Kafka through a recording
# relay, turned into corpora by edge/fuzz/examples/seeds.rs; plus configs and control-plane specs.
FUZZ_CAPTURE ?= $(HOME)/.cache/strait/fuzz-capture
fuzz-corpus: setup
	$(PYTHON) integration/scripts/fuzz_capture.py $(FUZZ_CAPTURE)
	cd edge/fuzz && CARGO_TARGET_DIR=$(HOME)/.cache/strait/target-fuzz cargo run -q --release --example seeds -- $(FUZZ_CAPTURE) corpus
	$(PYTHON) scripts/fuzz.py text-seeds
	scripts/setup-fuzz.sh
	python3 scripts/fuzz.py minimize

lint:
	cargo fmt --all -- --check
	cd edge/fuzz && cargo fmt -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all
