#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input (bundle loader, NIfTI reader, click files, session lines)
# with cargo fuzz (libFuzzer + AddressSanitizer), SECONDS_PER_TARGET each (default 10) from the
# committed seed corpus in fuzz/corpus/. CI runs the short version; for a long run:
#   scripts/fuzz.sh 3600
# The stable toolchain is enough: RUSTC_BOOTSTRAP lets it take the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
targets=(bundle_loader nifti_reader click_file session_line)
rm -rf fuzz/artifacts
cargo fuzz build --release -s address
for target in "${targets[@]}"; do
    work="fuzz/corpus-work/$target"
    mkdir -p "$work"
    echo "== fuzzing $target for ${seconds}s"
    cargo fuzz run --release -s address "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
        | grep -E "^(==|stat::number_of_executed_units|stat::new_units_added|.*(panicked|ERROR|SUMMARY))" || true
    if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "fuzzing $target found a crash: fuzz/artifacts/$target" >&2
        exit 1
    fi
done
