#!/usr/bin/env bash
# Records SVG flamegraphs of the dispatcher's hot paths (A2 fanout submit, B2 fetch, B3 fanout
# claim) with perf and inferno. Installs what it needs (linux-perf from Debian, inferno from
# crates.io). Usage: flamegraphs/record.sh [seconds per scenario, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds="${1:-5}"

command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno

cargo build --release -p switchyard-benches --bin profile
for scenario in a2 b2 b3; do
    data="target/perf-$scenario.data"
    echo "== $scenario"
    # A software clock (hardware counters are often unavailable in VMs); DWARF unwinding,
    # since release builds omit frame pointers.
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$data" \
        -- target/release/profile "$scenario" "$seconds"
    perf script -i "$data" 2>/dev/null |
        inferno-collapse-perf |
        inferno-flamegraph --title "switchyard $scenario" --width 1600 >"flamegraphs/$scenario.svg"
done
ls -la flamegraphs/*.svg
