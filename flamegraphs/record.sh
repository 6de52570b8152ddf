#!/usr/bin/env bash
# Records SVG flamegraphs with perf and inferno: the dispatcher's hot paths (a2: fanout submit,
# b2: fetch, b3: fanout claim) and the coordinator's HTTP path (http: the `switchyard` server
# under `http_load`, profiled alone). Installs what it needs (linux-perf from Debian, inferno
# from crates.io).
#
#   flamegraphs/record.sh [seconds per dispatcher scenario, default 5] [scenario ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
seconds="${1:-5}"
shift || true
scenarios=("${@:-a2 b2 b3 http}")
read -r -a scenarios <<<"${scenarios[*]}"

command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno

# A software clock (hardware counters are often unavailable in VMs); DWARF unwinding, since
# release builds omit frame pointers.
perf_args=(-q -e cpu-clock -F 499 --call-graph dwarf,16384)

fold() { # data file, scenario
    perf script -i "$1" 2>/dev/null |
        inferno-collapse-perf |
        inferno-flamegraph --title "switchyard $2" --width 1600 >"flamegraphs/$2.svg"
}

cargo build --release -p switchyard-benches --bin profile --bin http_load
cargo build --release -p switchyard-server
for scenario in "${scenarios[@]}"; do
    data="target/perf-$scenario.data"
    echo "== $scenario"
    if [ "$scenario" = http ]; then
        dir=$(mktemp -d)
        port=7979
        target/release/switchyard serve --bind "127.0.0.1:$port" --admin-token sy_profile_admin_token_for_flamegraphs \
            --mode least-loaded --data-dir "$dir" 2>"$dir/serve.log" &
        server=$!
        until grep -q 'serving' "$dir/serve.log"; do sleep 0.1; done
        perf record "${perf_args[@]}" -p "$server" -o "$data" &
        recorder=$!
        sleep 0.5
        target/release/http_load --server "http://127.0.0.1:$port" --token sy_profile_admin_token_for_flamegraphs \
            --tasks 100000 --conns 32
        kill -INT "$recorder"
        wait "$recorder" || true
        kill -INT "$server"
        wait "$server" || true
        rm -rf "$dir"
    else
        perf record "${perf_args[@]}" -o "$data" -- target/release/profile "$scenario" "$seconds"
    fi
    fold "$data" "$scenario"
done
ls -la flamegraphs/*.svg
