#!/usr/bin/env bash
# Run Sluice: set up the machine (scripts/setup.sh), build the release binary,
# start the service in the foreground and, once its HTTP port answers, a demo
# load in the background. Ctrl-C stops both.
#
#   scripts/run.sh [sluice flags...]
#
# Environment: everything the service reads (AMQP_URL, DATABASE_URL, HTTP_ADDR,
# RUST_LOG, ...; see README.md), plus
#   DEMO_LOAD=0     run the service alone, no demo load
#   DEMO_RATE=200   demo messages per second
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'run: %s\n' "$*"; }

scripts/setup.sh
say "building (cargo build --release)"
cargo build --release
bin=target/release/sluice

http_addr=${HTTP_ADDR:-127.0.0.1:8080}
http_host=${http_addr%:*}
http_port=${http_addr##*:}
[ "$http_host" = 0.0.0.0 ] && http_host=127.0.0.1
export RUST_LOG=${RUST_LOG:-info}

load_pid=
cleanup() {
    if [ -n "$load_pid" ]; then
        kill "$load_pid" 2>/dev/null || true
        wait "$load_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# ---- DEMO_LOAD hook -------------------------------------------------------
# Publishes a trickle of demo JSON events to the service's exchange with
# `sluice load` once that subcommand exists; until then the service runs alone.
if [ "${DEMO_LOAD:-1}" != 0 ]; then
    if "$bin" load --help >/dev/null 2>&1; then
        (
            # Start publishing once the service is up (it declares the topology first).
            for _ in $(seq 1 120); do
                (exec 3<>"/dev/tcp/$http_host/$http_port") 2>/dev/null && break
                sleep 0.5
            done
            exec "$bin" load --rate "${DEMO_RATE:-200}" --forever
        ) &
        load_pid=$!
        say "demo load: ${DEMO_RATE:-200} msg/s via '$bin load' once http://$http_addr answers"
    else
        say "demo load: '$bin load' not available yet; running the service alone"
    fi
fi
# ---------------------------------------------------------------------------

say "starting $bin (dashboard on http://$http_addr; Ctrl-C to stop)"
# In the foreground, so Ctrl-C reaches it directly and it shuts down gracefully.
# Background jobs of a script ignore SIGINT, so the EXIT trap stops the load.
status=0
"$bin" "$@" || status=$?
say "service exited with status $status"
exit "$status"
