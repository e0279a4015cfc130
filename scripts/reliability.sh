#!/usr/bin/env bash
# Warren's fault-injection scenarios (tests/tests/faults.rs), one at a time, with the
# checker's report of each, summed up as the table in docs/reliability.md:
#
#   scripts/reliability.sh            run every scenario, print each report and the table
#   scripts/reliability.sh --write    also replace the results in docs/reliability.md
#   scripts/reliability.sh -- FILTER  run only the scenarios whose test name contains FILTER
#
# Needs root (the partition scenario installs nftables rules and moves processes between
# cgroups) and nftables (scripts/install-test-deps.sh installs it). Reports (one JSON line
# per scenario) and the test log are kept in target/reliability/.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

write=false
filter=()
while [ $# -gt 0 ]; do
    case "$1" in
        --write) write=true ;;
        --) shift; filter=("$@"); break ;;
        *) echo "usage: $0 [--write] [-- FILTER]" >&2; exit 2 ;;
    esac
    shift
done

out=$root/target/reliability
rm -rf "$out"
mkdir -p "$out/reports"

scripts/install-test-deps.sh || exit 1
echo "cargo build -p warren"
cargo build -q -p warren || exit 1
export WARREN_BIN=${WARREN_BIN:-$root/target/debug/warren}
export WARREN_RELIABILITY_DIR=$out/reports

started=$SECONDS
# One scenario at a time: each measures how long publishing pauses, which concurrent
# clusters on the same cores would distort.
cargo test -p warren-tests --test faults -- --test-threads=1 --skip checker_ "${filter[@]}" 2>&1 |
    tee "$out/test.log" | grep -E '^test |panicked'
status=${PIPESTATUS[0]}
elapsed=$((SECONDS - started))
echo
for report in "$out"/reports/*.json; do
    [ -e "$report" ] && echo "checker report: $(cat "$report")"
done

revision=$(git describe --always --dirty 2>/dev/null || echo unknown)
cores=$(nproc 2>/dev/null || echo "?")
python3 - "$out" "$elapsed" "$status" "$revision" "$cores" >"$out/table.md" <<'EOF'
import datetime, json, os, re, sys

out, elapsed, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
revision, cores = sys.argv[4], sys.argv[5]
log = open(os.path.join(out, "test.log"), errors="replace").read()
outcomes = {}
for name, result in re.findall(r"^test (\w+) \.\.\. (ok|FAILED)", log, re.M):
    outcomes[name.replace("_", "-")] = "pass" if result == "ok" else "FAIL"
skipped, reports = {}, {}
for f in sorted(os.listdir(os.path.join(out, "reports"))):
    r = json.load(open(os.path.join(out, "reports", f)))
    if "skipped" in r:
        skipped[r["scenario"]] = r["skipped"]
    else:
        reports[r["scenario"]] = r

def ms(v):
    return "never" if v is None else (f"{v} ms" if v < 1000 else f"{v / 1000:.1f} s")

def worst(faults, key):
    values = [f[key] for f in faults]
    if not values:
        return "n/a"
    return ms(None if any(v is None for v in values) else max(values))

print("| Scenario | Result | Published | Confirmed | Lost | Unconfirmed or nacked | Duplicated (unexplained) | Drained | Longest publishing pause |")
print("|---|---|---:|---:|---:|---:|---:|---|---:|")
for name in sorted(set(outcomes) | set(reports) | set(skipped)):
    result = outcomes.get(name, "not run")
    if name in skipped:
        print(f"| {name} | skipped: {skipped[name]} | | | | | | | |")
        continue
    r = reports.get(name)
    if r is None:
        print(f"| {name} | {result} (no report) | | | | | | | |")
        continue
    print(
        f"| {name} | {result} | {r['published']} | {r['confirmed']} | {r['confirmed_lost']} "
        f"| {r['unconfirmed'] + r['nacked']} | {r['duplicated']} ({r['unexplained_duplicates']}) "
        f"| {'yes' if r['drained'] else 'NO'} | {worst(r['faults'], 'max_gap_ms')} |"
    )
print()
print("Per fault: the first confirm (any producer) after the fault was injected, and the")
print("longest gap between one producer's consecutive confirms from the fault until the next one.")
print()
print("| Scenario | Fault | First confirm after | Longest pause |")
print("|---|---|---:|---:|")
for name, r in sorted(reports.items()):
    for f in r["faults"]:
        print(
            f"| {name} | {f['fault']} | {ms(f['first_confirm_ms'])} | {ms(f['max_gap_ms'])} |"
        )
print()
print(
    f"All scenarios ran in {elapsed} s (test exit status {status}), "
    f"{datetime.date.today().isoformat()}, revision {revision}, {cores} cores."
)
EOF

echo
cat "$out/table.md"

if $write; then
    doc=docs/reliability.md
    python3 - "$doc" "$out/table.md" <<'EOF'
import sys
doc, table = sys.argv[1], open(sys.argv[2]).read()
text = open(doc).read()
begin, end = "<!-- reliability:begin -->", "<!-- reliability:end -->"
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(doc, "w").write(f"{head}{begin}\n{table}{end}{tail}")
EOF
    echo "updated $doc"
fi
exit "$status"
