#!/usr/bin/env bash
# Benchmark Warren against RabbitMQ on this machine, side by side, with `warren bench`.
#
#   scripts/bench.sh
#
# One command: builds warren in release mode, installs Debian's rabbitmq-server if it is
# missing, starts a throwaway RabbitMQ (scripts/rabbitmq.sh) and a throwaway `warren dev`
# cluster on free loopback ports, runs every scenario against both, measures each broker's CPU
# (its whole process tree, from /proc) and fsync calls (perf tracepoints, when perf works), writes
# docs/bench-results/<timestamp>.json, regenerates the results table in docs/benchmarks.md,
# and stops exactly the processes it started.
#
# Environment:
#   BENCH_DURATION       seconds each run publishes (default 20)
#   BENCH_DRAIN_TIMEOUT  seconds each run may wait for confirms and consumers (default 30)
#   BENCH_SCENARIOS      subset of "A1 A4 B1 B4 C1 C4 D1 M4 F1 S1" (default: all)
#   BENCH_REQUIRE_WARREN 1: fail if warren dev does not start (default: record Warren as pending)
#   BENCH_KEEP_WORKDIR   1: keep the temporary directory with logs and raw results
#   BENCH_SKIP_BUILD     1: use the existing target/release/warren instead of building
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DURATION=${BENCH_DURATION:-20}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-30}
SCENARIOS=${BENCH_SCENARIOS:-"A1 A4 B1 B4 C1 C4 D1 M4 F1 S1"}
REQUIRE_WARREN=${BENCH_REQUIRE_WARREN:-0}
KEEP_WORKDIR=${BENCH_KEEP_WORKDIR:-0}
WARREN_START_TIMEOUT=120

log() { echo "[bench] $*" >&2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The pid of the process that listens on 127.0.0.1:$1 (from /proc/net/tcp and /proc/*/fd).
listener_pid() {
    python3 - "$1" <<'EOF'
import os, sys
port = int(sys.argv[1])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        f = line.split()
        if f[3] == "0A" and int(f[1].split(":")[1], 16) == port:
            inodes.add(f[9])
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                print(pid)
                sys.exit(0)
    except OSError:
        pass
sys.exit(1)
EOF
}

# A JSON object describing the process tree rooted at $1: for every live process in it, its
# CPU seconds (utime+stime, plus cutime+cstime of children that already exited and were reaped)
# and a short name; {} once the root is gone.
tree_cpu() {
    python3 - "$1" <<'EOF'
import json, os, sys
root = sys.argv[1]
hz = os.sysconf("SC_CLK_TCK")
stats, children = {}, {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        raw = open(f"/proc/{pid}/stat").read()
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        continue
    f = raw[raw.rfind(")") + 2:].split()
    # A recognisable name: the executable plus the config file for Warren's role processes.
    name = os.path.basename(argv[0]) if argv and argv[0] else raw[raw.find("(") + 1:raw.rfind(")")]
    if "--config" in argv[:-1]:
        name += " " + os.path.basename(argv[argv.index("--config") + 1]).removesuffix(".toml")
    elif len(argv) > 1 and argv[1] in ("dev", "storage", "compute"):
        name += " " + argv[1]
    stats[pid] = (sum(int(x) for x in f[11:15]) / hz, name)
    children.setdefault(f[1], []).append(pid)
tree, todo = {}, [root]
while todo:
    pid = todo.pop()
    if pid in stats:
        tree[pid] = {"cpu_s": stats[pid][0], "name": stats[pid][1]}
        todo.extend(children.get(pid, []))
print(json.dumps(tree))
EOF
}

# Regenerate the results table in docs/benchmarks.md from one results file.
render_table() {
    python3 - "$1" docs/benchmarks.md <<'EOF'
import json, sys
result_path, doc_path = sys.argv[1:]
r = json.load(open(result_path))
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

def ms(us):
    return f"{us / 1000:.1f}" if us else "–"

rows = [
    f"Run `{r['generated_utc']}` ({r['duration_s']} s per run; raw data: "
    f"[`docs/bench-results/{r['generated_utc']}.json`](bench-results/{r['generated_utc']}.json)).",
    "",
    "| scenario | broker | queue | published msg/s | confirmed msg/s | consumed msg/s "
    "| confirm p50 / p99 / p99.9 ms | end-to-end p50 / p99 ms | broker CPU µs/msg "
    "| bench CPU µs/msg | msgs per fsync |",
    "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
]
for s in r["scenarios"]:
    for broker in ("rabbitmq", "warren"):
        run = s["runs"][broker]
        name = "RabbitMQ" if broker == "rabbitmq" else "Warren"
        if run["status"] != "ok":
            rows.append(f"| {s['id']} | {name} | | {run['status']} | | | | | | | |")
            continue
        rep = run["report"]
        rates, c, e = rep["rates"], rep["confirm_latency_us"], rep["e2e_latency_us"]
        confirm = f"{ms(c['p50'])} / {ms(c['p99'])} / {ms(c['p999'])}" if c["count"] else "–"
        drained = "" if rep["drained"] else " (not drained)"
        # Transient messages are never fsync'd; the few fsyncs there are bookkeeping.
        mpf = run["msgs_per_fsync"] if s["durable"] else None
        published = rep["totals"]["published"]
        bench_cpu = f"{rep['bench_cpu_s'] * 1e6 / published:.1f}" if published and rep.get("bench_cpu_s") else "–"
        rows.append(
            f"| {s['id']} | {name} | {run['queue']} | {rates['published']:,.0f} | "
            f"{rates['confirmed']:,.0f} | {rates['consumed']:,.0f}{drained} | {confirm} | "
            f"{ms(e['p50'])} / {ms(e['p99'])} | {run['broker_cpu_us_per_msg']} | {bench_cpu} | "
            f"{mpf if mpf is not None else '–'} |"
        )
rows.append("")
rows.append("Scenarios: " + "; ".join(f"**{s['id']}** {s['title']}" for s in r["scenarios"]) + ".")
table = "\n".join(rows)

try:
    doc = open(doc_path).read()
except FileNotFoundError:
    doc = f"# Benchmarks\n\n{BEGIN}\n{END}\n"
if BEGIN not in doc or END not in doc:
    doc = doc.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
head, rest = doc.split(BEGIN, 1)
_, tail = rest.split(END, 1)
open(doc_path, "w").write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
print(table)
EOF
}

if [ "${1:-}" = "--table" ]; then
    [ $# -eq 2 ] || { echo "usage: $0 [--table docs/bench-results/<run>.json]" >&2; exit 2; }
    render_table "$2"
    exit 0
fi

PERF_OK=0
if command -v perf >/dev/null 2>&1 &&
    perf stat -e syscalls:sys_enter_fdatasync -a -- true >/dev/null 2>&1; then
    PERF_OK=1
fi

# (a) build
if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
    log "using the existing target/release/warren (BENCH_SKIP_BUILD=1)"
else
    log "building warren (release)"
    cargo build --release -p warren
fi
WORK=$(mktemp -d /tmp/warren-bench.XXXXXX)
mkdir -p "$WORK/results"
cat /proc/loadavg >"$WORK/loadavg-start"
# A private copy, so that a rebuild during the run cannot swap the binary under it.
cp target/release/warren "$WORK/warren"
WARREN_BIN="$WORK/warren"

# (b) RabbitMQ from Debian
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    log "installing rabbitmq-server from Debian"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server
fi

RPORT=$(free_port)
WPORT=$(free_port)
HPORT=$(free_port)
WPID=""
RABBIT_STARTED=0
PERF_PID=""

stop_warren() {
    [ -n "$WPID" ] || return 0
    # warren dev stops its children on SIGTERM; the process group is the backstop.
    kill -TERM "$WPID" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$WPID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$WPID" 2>/dev/null || true
    wait "$WPID" 2>/dev/null || true
    WPID=""
}

cleanup() {
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
    fi
    stop_warren
    if [ "$RABBIT_STARTED" = 1 ]; then
        scripts/rabbitmq.sh stop "$WORK/rabbitmq" "$RPORT" || true
    fi
    if [ "$KEEP_WORKDIR" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# (c) start both brokers
log "starting RabbitMQ on port $RPORT"
RABBIT_STARTED=1
RABBIT_URI=$(scripts/rabbitmq.sh start "$WORK/rabbitmq" "$RPORT" | tail -n 1)
RABBIT_PID=$(listener_pid "$RPORT")

# Start `warren dev` with the shape a scenario asks for: "single" (3 storage nodes, 1 compute
# node: the default), "three" (3 compute nodes, one per zone) or "strict" (6 storage nodes, 2
# per zone, the strict replication profile, 1 compute node). Sets WPID and WARREN_URIS (one
# --uri per compute node); leaves WARREN_URIS empty if the cluster does not come up.
WARREN_SHAPE=""
start_warren() {
    local shape=$1 flags=""
    case $shape in
        single) flags="" ;;
        three) flags="--compute 3" ;;
        strict) flags="--storage-per-zone 2 --replication strict" ;;
        *) log "unknown cluster shape $shape"; exit 2 ;;
    esac
    stop_warren
    WARREN_SHAPE=$shape
    WARREN_URIS=""
    WPORT=$(free_port)
    log "starting warren dev ($shape) on port $WPORT"
    rm -rf "$WORK/warren-data"
    # The journal's debug lines (group commits, files freed) help explain latency outliers.
    # shellcheck disable=SC2086 # $flags is a word list
    RUST_LOG=${RUST_LOG:-info,warren_storage::node::store=debug} \
        setsid "$WARREN_BIN" dev --data-dir "$WORK/warren-data" --amqp-port "$WPORT" --http-port "$HPORT" \
        $flags </dev/null >"$WORK/warren-$shape.log" 2>&1 &
    WPID=$!
    local want=1 urls="" deadline=$((SECONDS + WARREN_START_TIMEOUT))
    [ "$shape" = three ] && want=3
    while [ $SECONDS -lt $deadline ]; do
        urls=$(grep -o "amqp://[^ ]*" "$WORK/warren-$shape.log" | head -n "$want" || true)
        [ "$(echo "$urls" | grep -c amqp://)" -ge "$want" ] && break
        urls=""
        kill -0 "$WPID" 2>/dev/null || break
        sleep 0.5
    done
    if [ -z "$urls" ]; then
        log "warren dev ($shape) did not print its amqp:// URLs; last log lines:"
        tail -n 20 "$WORK/warren-$shape.log" >&2 || true
        stop_warren
        if [ "$REQUIRE_WARREN" = 1 ]; then
            exit 1
        fi
        log "continuing: Warren's results for this shape are recorded as pending"
        return 0
    fi
    for url in $urls; do
        # Per the AMQP URI spec an empty path names the vhost "", not "/".
        case $url in */) url="${url}%2f" ;; esac
        WARREN_URIS="$WARREN_URIS --uri $url"
    done
}

# One run of `warren bench` against one broker, with the CPU and fsyncs of both brokers.
# Usage: run_one <label> <broker> "<--uri U [--uri U2 ...]>" <bench args...>
run_one() {
    local label=$1 broker=$2 uris=$3
    shift 3
    local rabbit_before warren_before rabbit_after warren_after perf_out=""
    rabbit_before=$(tree_cpu "$RABBIT_PID")
    warren_before=$( [ -n "$WPID" ] && tree_cpu "$WPID" || echo "{}")
    if [ "$PERF_OK" = 1 ]; then
        perf_out="$WORK/results/$label.perf"
        perf record -q -a -e syscalls:sys_enter_fsync -e syscalls:sys_enter_fdatasync \
            -o "$perf_out" >/dev/null 2>&1 &
        PERF_PID=$!
        sleep 0.5
    fi
    log "$label: $broker $*"
    local status=0
    # shellcheck disable=SC2086 # $uris is a word list
    "$WARREN_BIN" bench $uris --duration "$DURATION" --drain-timeout "$DRAIN_TIMEOUT" \
        --quiet --id "$label" --json "$WORK/results/$label.json" "$@" \
        >"$WORK/results/$label.txt" 2>&1 || status=$?
    rabbit_after=$(tree_cpu "$RABBIT_PID")
    warren_after=$( [ -n "$WPID" ] && tree_cpu "$WPID" || echo "{}")
    local fsyncs="{}"
    if [ -n "$PERF_PID" ]; then
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=""
        # fsync calls per process (tgid) during the run.
        fsyncs=$(perf script -i "$perf_out" -F pid 2>/dev/null |
            python3 -c 'import sys, json, collections; print(json.dumps(collections.Counter(l.strip() for l in sys.stdin if l.strip())))')
        rm -f "$perf_out"
    fi
    cat "$WORK/results/$label.txt" >&2
    python3 - "$WORK/results/$label.meta.json" "$label" "$broker" "$status" \
        "$rabbit_before" "$rabbit_after" "$warren_before" "$warren_after" "$fsyncs" <<'EOF'
import json, sys
path, label, broker, status, rb, ra, wb, wa, fsyncs = sys.argv[1:]
rb, ra, wb, wa = map(json.loads, (rb, ra, wb, wa))
fsyncs = json.loads(fsyncs)

def delta(before, after):
    """CPU used during the run, in total and per process (by name, summed)."""
    per = {}
    for pid, p in after.items():
        used = p["cpu_s"] - before.get(pid, {"cpu_s": 0.0})["cpu_s"]
        per[p["name"]] = round(per.get(p["name"], 0.0) + used, 3)
    return round(sum(per.values()), 3), per

def fsyncs_of(before, after):
    pids = set(before) | set(after)
    return sum(n for pid, n in fsyncs.items() if pid in pids)

rabbit_cpu, rabbit_per = delta(rb, ra)
warren_cpu, warren_per = delta(wb, wa)
json.dump({
    "label": label, "broker": broker, "exit_status": int(status),
    "rabbitmq_cpu_s": rabbit_cpu, "rabbitmq_cpu_by_process": rabbit_per,
    "warren_cpu_s": warren_cpu, "warren_cpu_by_process": warren_per,
    "rabbitmq_fsyncs": fsyncs_of(rb, ra) if fsyncs else None,
    "warren_fsyncs": fsyncs_of(wb, wa) if fsyncs else None,
}, open(path, "w"))
EOF
}

# (d) scenarios: <id>|<title>|<rabbitmq queue args>|<durable queues>|<warren shape>|<bench args>
scenario_line() {
    local durable_common="--persistent --confirm 100 --prefetch 100 --size 1024"
    local transient_common="--confirm 0 --auto-ack --size 1024"
    case $1 in
        A1) echo "A1|persistent, confirms (window 100), manual ack (prefetch 100), 1 KB, 1 producer / 1 consumer|x-queue-type=quorum|true|single|$durable_common -x 1 -y 1" ;;
        A4) echo "A4|persistent, confirms (window 100), manual ack (prefetch 100), 1 KB, 4 producers / 4 consumers on 4 queues|x-queue-type=quorum|true|single|$durable_common -x 4 -y 4" ;;
        B1) echo "B1|persistent, confirms (window 100), manual ack (prefetch 100), 1 KB, 1 producer / 1 consumer|x-queue-type=classic|true|single|$durable_common -x 1 -y 1" ;;
        B4) echo "B4|persistent, confirms (window 100), manual ack (prefetch 100), 1 KB, 4 producers / 4 consumers on 4 queues|x-queue-type=classic|true|single|$durable_common -x 4 -y 4" ;;
        C1) echo "C1|transient, no confirms, auto-ack, 1 KB, 1 producer / 1 consumer|x-queue-type=classic|false|single|$transient_common -x 1 -y 1" ;;
        C4) echo "C4|transient, no confirms, auto-ack, 1 KB, 4 producers / 4 consumers on 4 queues|x-queue-type=classic|false|single|$transient_common -x 4 -y 4" ;;
        # Latency at a moderate fixed rate, where no backlog builds up and end-to-end latency is
        # the broker's own, not queueing behind an unbounded publisher.
        D1) echo "D1|as A1 at a fixed 1,000 msg/s: latency without backlog|x-queue-type=quorum|true|single|$durable_common -x 1 -y 1 --rate 1000" ;;
        # The cluster: Warren runs 3 compute nodes (one per zone) and clients spread over them,
        # each consumer on a different node from its queue's producer, so most operations are
        # forwarded to the queue's owner. RabbitMQ is the same single node as above.
        M4) echo "M4|as A4 with Warren's clients spread over 3 compute nodes (consumers on another node than their producer)|x-queue-type=quorum|true|three|$durable_common -x 4 -y 4 --consumer-uri-offset 1" ;;
        F1) echo "F1|as A1 with Warren's producer and consumer on different compute nodes of 3 (forwarding cost)|x-queue-type=quorum|true|three|$durable_common -x 1 -y 1 --consumer-uri-offset 1" ;;
        # The strict replication profile: 6 copies (2 per zone), 4 must ack.
        S1) echo "S1|as A1 with Warren's strict replication (6 copies over 3 zones, ack 4)|x-queue-type=quorum|true|strict|$durable_common -x 1 -y 1" ;;
        *) log "unknown scenario $1"; exit 2 ;;
    esac
}

: >"$WORK/scenarios.tsv"
for id in $SCENARIOS; do
    IFS='|' read -r sid title rabbit_args durable shape bench_args <<<"$(scenario_line "$id")"
    printf '%s\t%s\t%s\t%s\n' "$sid" "$title" "$rabbit_args" "$durable" >>"$WORK/scenarios.tsv"
    queues="bench-$sid"
    case $bench_args in *"-x 4"*) queues="bench-$sid-%d --queue-pattern-to 4" ;; esac
    # shellcheck disable=SC2086 # word splitting of the argument lists is intended
    run_one "$sid-rabbitmq" rabbitmq "--uri $RABBIT_URI" $bench_args --queues $queues \
        --queue-durable "$durable" --queue-args "$rabbit_args"
    if [ "$shape" != "$WARREN_SHAPE" ]; then
        start_warren "$shape"
    fi
    if [ -n "$WARREN_URIS" ]; then
        # shellcheck disable=SC2086
        run_one "$sid-warren" warren "$WARREN_URIS" $bench_args --queues $queues \
            --queue-durable "$durable"
    fi
done

# (f) record and regenerate the table
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p docs/bench-results
RESULT="docs/bench-results/$STAMP.json"
python3 - "$WORK" "$RESULT" "$DURATION" "$DRAIN_TIMEOUT" "$(git rev-parse --short HEAD)" \
    "$(git status --porcelain --untracked-files=no | wc -l)" "$PERF_OK" <<'EOF'
import json, os, platform, subprocess, sys
work, out, duration, drain, commit, dirty, perf_ok = sys.argv[1:]

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None

cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
mem_kib = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
machine = {
    "cpus": os.cpu_count(),
    "cpu_model": cpu_model,
    "memory_gib": round(mem_kib / 1024 / 1024, 1),
    "kernel": platform.release(),
    "os": next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME=")), None),
    "rabbitmq": sh("dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"),
    "erlang": sh("dpkg-query", "-W", "-f=${Version}", "erlang-base"),
    "warren_commit": commit + ("+uncommitted" if int(dirty) else ""),
    "loadavg_at_start": open(os.path.join(work, "loadavg-start")).read().split()[:3],
    "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
}
scenarios = []
for line in open(os.path.join(work, "scenarios.tsv")):
    sid, title, rabbit_args, durable = line.rstrip("\n").split("\t")
    runs = {}
    for broker in ("rabbitmq", "warren"):
        label = f"{sid}-{broker}"
        meta_path = os.path.join(work, "results", label + ".meta.json")
        if not os.path.exists(meta_path):
            runs[broker] = {"status": "pending"}
            continue
        meta = json.load(open(meta_path))
        report_path = os.path.join(work, "results", label + ".json")
        text = open(os.path.join(work, "results", label + ".txt")).read()
        if meta["exit_status"] != 0 or not os.path.exists(report_path):
            runs[broker] = {"status": "failed", "output": text[-2000:]}
            continue
        report = json.load(open(report_path))
        published = report["totals"]["published"]
        cpu = meta[f"{broker}_cpu_s"]
        fsyncs = meta[f"{broker}_fsyncs"]
        runs[broker] = {
            "status": "ok",
            "queue": ("quorum" if "quorum" in rabbit_args else "classic " + ("durable" if durable == "true" else "non-durable"))
                     if broker == "rabbitmq" else ("durable" if durable == "true" else "non-durable"),
            "report": report,
            "broker_cpu_s": cpu,
            "broker_cpu_by_process": meta[f"{broker}_cpu_by_process"],
            "broker_cpu_us_per_msg": round(cpu * 1e6 / published, 1) if published else None,
            "other_broker_cpu_s": meta["warren_cpu_s" if broker == "rabbitmq" else "rabbitmq_cpu_s"],
            "fsyncs": fsyncs,
            "msgs_per_fsync": round(published / fsyncs, 1) if fsyncs else None,
        }
    scenarios.append({"id": sid, "title": title, "rabbitmq_queue_args": rabbit_args,
                      "durable": durable == "true", "runs": runs})
result = {
    "generated_utc": os.path.basename(out)[:-5],
    "duration_s": int(duration),
    "drain_timeout_s": int(drain),
    "fsyncs_counted": perf_ok == "1",
    "machine": machine,
    "scenarios": scenarios,
}
json.dump(result, open(out, "w"), indent=2)
print(out)
EOF
log "wrote $RESULT"
render_table "$RESULT"
log "updated docs/benchmarks.md"
