#!/usr/bin/env bash
# Run fuzz targets for a while each and print a table: target, seconds, executions, coverage,
# corpus size, and whether libFuzzer found a crash (artifacts go to fuzz/artifacts/<target>/).
#
#   fuzz/run.sh [--seconds 600] [--jobs 2] [TARGET...]     # default: every target
#
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`). Seeds the corpora first
# (fuzz/seed.sh). Logs: fuzz/logs/<target>.log.
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
seconds=600
jobs=1
targets=()
while (($#)); do
    case $1 in
        --seconds) seconds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
cd "$here"
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
bash "$here/seed.sh" >&2
cargo +nightly fuzz build >&2
mkdir -p logs

run_one() {
    local t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    # -rss_limit_mb: a parser must stay within bounded memory whatever the input.
    if cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" \
        -rss_limit_mb=2048 -print_final_stats=1 >"logs/$t.log" 2>&1; then
        echo "$t ok"
    else
        echo "$t FAILED"
    fi
}
export -f run_one
export seconds

printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}' >"logs/summary" 2>&1 || true

printf '| target | seconds | executions | coverage | corpus | result |\n|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
    log=logs/$t.log
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
    corp=$(find "corpus/$t" -type f | wc -l)
    result=$(grep -q "^$t ok" logs/summary && echo "no finding" || echo "**finding: see $log**")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$seconds" "$execs" "$cov" "$corp" "$result"
done
