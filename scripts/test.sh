#!/usr/bin/env bash
# Run every test of Sluice the way CI does: set up the machine
# (scripts/setup.sh --with-browser), then formatting, lints, and all unit and
# integration tests of the workspace against the real RabbitMQ and PostgreSQL.
# Exits non-zero on the first failing step; the test step runs every test
# (no fail-fast) and ends with a one-line summary.
#
#   scripts/test.sh [extra arguments for the test runner]
#
# Uses cargo-nextest when installed (one process per test, per-test timeouts
# from .config/nextest.toml), else `cargo test`. SLUICE_NO_NEXTEST=1 forces
# `cargo test`. SLUICE_TEST_TIMEOUT (seconds, default 1500) bounds the test step.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'test: %s\n' "$*"; }
step() {
    say "$*"
    "$@"
}

scripts/setup.sh --with-browser

step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets -- -D warnings

timeout_s=${SLUICE_TEST_TIMEOUT:-1500}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if [ "${SLUICE_NO_NEXTEST:-0}" != 1 ] && cargo nextest --version >/dev/null 2>&1; then
    # nextest ends with its own "Summary [...] N tests run: ..." line.
    step timeout -k 30 "$timeout_s" cargo nextest run --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    step cargo test --workspace --doc --no-fail-fast
else
    status=0
    say "timeout -k 30 $timeout_s cargo test --workspace --no-fail-fast $*"
    timeout -k 30 "$timeout_s" cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
    # One closing line over all test binaries.
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1)
                if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            }
            b++
        }
        END { printf "test: summary: %d passed, %d failed, %d ignored in %d test binaries\n", p, f, g, b }' "$log"
    if [ "$status" -ne 0 ]; then
        say "FAILED (exit status $status)"
        exit "$status"
    fi
fi
say "all green"
