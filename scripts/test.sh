#!/usr/bin/env bash
# Warren's whole test suite, exactly as CI runs it:
#
#   scripts/test.sh                      install test dependencies, build, run every runner:
#                                        Rust (nextest), Python (pytest), Node (node --test),
#                                        Java (official RabbitMQ client)
#   scripts/test.sh --against-rabbitmq   run the client suites that take WARREN_TEST_AMQP_URL
#                                        against a throwaway RabbitMQ instead of Warren, which
#                                        proves the expectations themselves are RabbitMQ's
#
# Every runner's output is also kept in target/test-logs/. The last line is
# `N passed, N failed` over all runners; the exit status is non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

against_rabbitmq=false
for arg in "$@"; do
    case "$arg" in
        --against-rabbitmq) against_rabbitmq=true ;;
        *) echo "usage: $0 [--against-rabbitmq]" >&2; exit 2 ;;
    esac
done

started=$SECONDS
logs=$root/target/test-logs
mkdir -p "$logs"
total_passed=0
total_failed=0
summary=()

section() { printf '\n==== %s ====\n' "$*"; }

# record <runner> <passed> <failed> <exit status>: a runner that exits non-zero without
# reporting a failed test (crash, build error, time-out) counts as one failure.
record() {
    local name=$1 passed=$2 failed=$3 status=$4
    if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed=1
    fi
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
    summary+=("$(printf '%-8s %5d passed, %3d failed (exit %d)' "$name" "$passed" "$failed" "$status")")
}

# The sum of every "<number> <word>" match in a log, e.g. sum_of passed file.
sum_of() {
    grep -oE "[0-9]+ $1" "$2" | awk '{s += $1} END {print s + 0}'
}

finish() {
    section "summary"
    printf '%s\n' "${summary[@]}"
    echo "total time: $((SECONDS - started))s"
    echo "$total_passed passed, $total_failed failed"
    [ "$total_failed" -eq 0 ]
    exit $?
}

section "dependencies"
deps_args=()
$against_rabbitmq && deps_args+=(--rabbitmq)
if ! scripts/install-test-deps.sh "${deps_args[@]}"; then
    record deps 0 1 1
    finish
fi

rabbit_dir=""
stop_rabbit() {
    if [ -n "$rabbit_dir" ]; then
        scripts/rabbitmq.sh stop "$rabbit_dir" "$rabbit_port" || true
        rm -rf "$rabbit_dir"
    fi
}
trap stop_rabbit EXIT

if $against_rabbitmq; then
    section "reference RabbitMQ"
    rabbit_dir=$(mktemp -d -t warren-rabbitmq-XXXXXX)
    rabbit_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if ! url=$(scripts/rabbitmq.sh start "$rabbit_dir" "$rabbit_port"); then
        record rabbitmq 0 1 1
        finish
    fi
    export WARREN_TEST_AMQP_URL=$url
    echo "running client suites against $WARREN_TEST_AMQP_URL"
fi

if ! $against_rabbitmq; then
    section "build"
    echo "cargo build -p warren (full output in target/test-logs/build.log)"
    cargo build -p warren 2>&1 | tee "$logs/build.log" | grep -E '^(error|Finished|\s+Finished)'
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        tail -n 40 "$logs/build.log"
        record build 0 1 1
        finish
    fi
fi
export WARREN_BIN=${WARREN_BIN:-$root/target/debug/warren}

# ---- Rust ----------------------------------------------------------------------------------
section "rust"
rust_filter=()
if $against_rabbitmq; then
    # The tests that honour WARREN_TEST_AMQP_URL, and those that kill and restart the whole
    # broker, which WARREN_TEST_REFERENCE=rabbitmq points at RabbitMQ processes.
    export WARREN_TEST_REFERENCE=rabbitmq
    rust_filter=(-p warren-tests --test bad_input --test durability --test faults)
    if cargo nextest --version >/dev/null 2>&1; then
        rust_filter+=(-E 'binary(bad_input) | test(=confirmed_persistent_stream_round_trips_in_order)
            | test(=restart_after_kill_all_recovers_confirmed_in_order_and_redelivers_unacked)
            | test(=kill_all_during_confirmed_publishes_keeps_every_confirmed_message)
            | test(=restart_keeps_durable_topology_and_drops_transient_topology)
            | test(=checker_passes_without_faults)
            | test(=checker_reports_purged_confirmed_messages_as_lost)')
    fi
else
    rust_filter=(--workspace)
fi
if cargo nextest --version >/dev/null 2>&1; then
    timeout 30m cargo nextest run "${rust_filter[@]}" --no-fail-fast \
        --tool-config-file "warren-tests:$root/tests/nextest.toml" 2>&1 | tee "$logs/rust.log"
    status=${PIPESTATUS[0]}
    line=$(grep -E '^\s*Summary \[' "$logs/rust.log" | tail -n 1)
    passed=$(echo "$line" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
    failed=$(echo "$line" | grep -oE '[0-9]+ (failed|timed out)' | awk '{s += $1} END {print s + 0}')
else
    timeout 30m cargo test "${rust_filter[@]}" --no-fail-fast 2>&1 | tee "$logs/rust.log"
    status=${PIPESTATUS[0]}
    passed=$(grep -E '^test result:' "$logs/rust.log" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
    failed=$(grep -E '^test result:' "$logs/rust.log" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
fi
record rust "${passed:-0}" "${failed:-0}" "$status"

# ---- Python --------------------------------------------------------------------------------
section "python"
timeout 15m .venv/bin/pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$logs/python.log"
status=${PIPESTATUS[0]}
line=$(grep -E '(passed|failed|error|no tests ran)' "$logs/python.log" | tail -n 1)
passed=$(echo "$line" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
failed=$(echo "$line" | grep -oE '[0-9]+ (failed|errors?)' | awk '{s += $1} END {print s + 0}')
record python "${passed:-0}" "${failed:-0}" "$status"

# ---- Node ----------------------------------------------------------------------------------
section "node"
timeout 10m node --test --test-timeout=180000 tests/node 2>&1 | tee "$logs/node.log"
status=${PIPESTATUS[0]}
passed=$(grep -E '^# pass [0-9]+' "$logs/node.log" | tail -n 1 | grep -oE '[0-9]+' || echo 0)
failed=$(grep -E '^# (fail|cancelled) [0-9]+' "$logs/node.log" | grep -oE '[0-9]+' | awk '{s += $1} END {print s + 0}')
record node "${passed:-0}" "${failed:-0}" "$status"

# ---- Java ----------------------------------------------------------------------------------
section "java"
java_cp=/usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar
java_out=$root/target/java-tests
rm -rf "$java_out" && mkdir -p "$java_out"
if javac -cp "$java_cp" -d "$java_out" tests/java/*.java 2>&1 | tee "$logs/java-build.log"; then
    timeout 10m java -cp "$java_out:$java_cp:/usr/share/java/slf4j-nop.jar" WarrenJavaTests 2>&1 |
        tee "$logs/java.log"
    status=${PIPESTATUS[0]}
    line=$(grep -E '^java: [0-9]+ passed, [0-9]+ failed' "$logs/java.log" | tail -n 1)
    passed=$(echo "$line" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
    failed=$(echo "$line" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || echo 0)
    record java "${passed:-0}" "${failed:-0}" "$status"
else
    record java 0 1 1
fi

# ---- Lint ----------------------------------------------------------------------------------
# Formatting and clippy are part of the suite: a change that breaks either fails CI.
if ! $against_rabbitmq; then
    section "lint"
    lint_failed=0
    cargo fmt --all --check >"$logs/fmt.log" 2>&1 || { lint_failed=$((lint_failed + 1)); head -n 40 "$logs/fmt.log"; }
    if ! cargo clippy --workspace --all-targets -- -D warnings >"$logs/clippy.log" 2>&1; then
        lint_failed=$((lint_failed + 1))
        grep -E -A8 '^(error|warning)' "$logs/clippy.log" | head -n 60
    fi
    echo "lint: fmt and clippy, $lint_failed failed"
    record lint $((2 - lint_failed)) "$lint_failed" 0
fi

finish
