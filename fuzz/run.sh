#!/usr/bin/env bash
# Builds and runs Ward's cargo-fuzz targets for SECONDS each, then prints one line per target:
# runs, execs/s, coverage (libFuzzer's cov/ft counters), corpus size, and whether it crashed.
#
#   fuzz/run.sh SECONDS [TARGET...]      (default: every target in fuzz/fuzz_targets)
#
# Works on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept the -Z flags
# cargo-fuzz passes (sanitizer, coverage). Installs cargo-fuzz from crates.io when missing.
# Everything it writes goes under $TARGET_DIR/fuzz (default target/fuzz): the build, the
# corpus (corpus/TARGET, kept between runs and seeded by the targets themselves through
# WARD_FUZZ_SEEDS), crash inputs (artifacts/TARGET) and logs.
#
# Environment: FUZZ_SANITIZER (address | none; default address), FUZZ_PROFILE (release |
# dev; default release: optimised, with debug assertions), CARGO. `make test`'s smoke run uses
# dev without a sanitizer: its cold build takes a third of the CPU time of release + ASan.
set -euo pipefail

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo=${CARGO:-cargo}
out=${TARGET_DIR:-${CARGO_TARGET_DIR:-target}}/fuzz
case $out in /*) ;; *) out=$root/$out ;; esac
sanitizer=${FUZZ_SANITIZER:-address}
case ${FUZZ_PROFILE:-release} in
  release) flags=(--sanitizer "$sanitizer") ;;
  dev) flags=(--dev --sanitizer "$sanitizer") ;;
  *) echo "FUZZ_PROFILE must be release or dev" >&2; exit 2 ;;
esac
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

if ! $cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (crates.io)"
  $cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

mkdir -p "$out"
started=$(date +%s)
# One build of every target (they share all their dependencies).
$cargo fuzz build "${flags[@]}" --target-dir "$out" 2>"$out/build.log" \
  || { tail -40 "$out/build.log"; exit 1; }
echo "fuzz: built the targets (${FUZZ_PROFILE:-release}, sanitizer $sanitizer) in $(( $(date +%s) - started )) s"

failed=0
for t in "${targets[@]}"; do
  corpus=$out/corpus/$t
  artifacts=$out/artifacts/$t/
  log=$out/$t.log
  mkdir -p "$corpus" "$artifacts"
  # The target writes its seeds into its corpus before libFuzzer reads it (init block).
  if WARD_FUZZ_SEEDS=$corpus $cargo fuzz run "${flags[@]}" --target-dir "$out" \
       "$t" "$corpus" -- -max_total_time="$seconds" -timeout=10 \
       -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1; then
    verdict=ok
  else
    verdict="CRASHED (see $log; input in $artifacts)"
    failed=1
  fi
  runs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s+=$2} END {print s+0}')
  rate=$(grep -h 'stat::average_exec_per_sec' "$log" | awk '{s+=$2} END {print s+0}')
  last=$(grep -hE '^#[0-9]+.*cov: ' "$log" | tail -1)
  cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.*corp: ([0-9]+).*/\1/p' <<<"$last")
  printf 'fuzz: %-8s %5s s  %10s runs  %7s execs/s  cov %5s  ft %6s  corpus %5s  %s\n' \
    "$t" "$seconds" "$runs" "$rate" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$verdict"
  if [ "$verdict" != ok ]; then
    grep -m1 -A12 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)' "$log" || tail -30 "$log"
  fi
done
echo "fuzz: done in $(( $(date +%s) - started )) s"
exit $failed
