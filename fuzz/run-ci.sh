#!/usr/bin/env bash
# CI: run every fuzz target for a bounded time on the stable toolchain (no sanitizer), built
# with debug assertions (`-a`): an arithmetic overflow or a failed `debug_assert!` is a crash.
#
#   FUZZ_SECONDS   seconds per target (default 25)
#   FUZZ_TARGETS   space-separated targets (default: all of `cargo fuzz list`)
#   FUZZ_SEED      libFuzzer's random seed (default 1, so that a CI run is reproducible;
#                  set it to 0 for a fresh random seed each run)
#
# A crash, a panic or a hang (an input running over 10 s) fails the run with a non-zero
# exit; the reproducer is left in fuzz/artifacts/<target>/ and its path printed, with the
# commands that replay and show it.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-25}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found: installing it" >&2
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"

# Build once up front, so each target's time budget is spent fuzzing.
cargo fuzz build --sanitizer none -a

failed=()
for target in $targets; do
  corpus="fuzz/corpus/$target"
  seeds="fuzz/seeds/$target"
  artifacts="fuzz/artifacts/$target"
  # Beside, not inside, the artifacts folder: cargo-fuzz reports the newest file there as the crash.
  log="fuzz/artifacts/$target.log"
  mkdir -p "$corpus" "$artifacts"
  # The first corpus folder is the one libFuzzer adds to: the working corpus, never the seeds.
  corpora=("$corpus")
  [[ -d "$seeds" ]] && corpora+=("$seeds")
  echo "=== fuzzing $target for ${seconds}s (log: $log)"
  if cargo fuzz run --sanitizer none -a "$target" "${corpora[@]}" -- \
    -max_total_time="$seconds" -seed="${FUZZ_SEED:-1}" -timeout=10 -dict=fuzz/json.dict -print_final_stats=1 \
    2>&1 | tee "$log" | { grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::number_of_executed_units)' || true; }; then
    echo "=== $target: no crash"
  else
    failed+=("$target")
    echo "=== $target: FAILED; the end of its log:" >&2
    tail -n 60 "$log" >&2
    while read -r unit; do
      echo "reproducer: $unit" >&2
      echo "  replay: cargo fuzz run --sanitizer none -a $target $unit" >&2
      echo "  show:   cargo fuzz fmt --sanitizer none -a $target $unit" >&2
    done < <(grep -o 'Test unit written to [^ ]*' "$log" | sed 's/^Test unit written to //')
  fi
done

if ((${#failed[@]})); then
  echo "fuzzing failed: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing: every target ran ${seconds}s without a crash"
