#!/usr/bin/env bash
# Builds the libFuzzer targets and runs each for a while.
#
#   fuzz/run.sh [SECONDS] [TARGET...]   build, run each TARGET (default: all)
#                                       for SECONDS (default 60)
#   fuzz/run.sh --no-build ...          the same without `make` first
#   fuzz/run.sh --repro                 run every reproducer in fuzz/repro/
#                                       once, known-bug workarounds off
#
# FUZZ_SEED=N makes the mutation sequence repeatable (libFuzzer -seed=N;
# unset or 0: a random seed, printed in the log).
#
# Each target starts from its seed corpus (fuzz/corpus/TARGET, read only)
# and keeps what it finds in fuzz/build/corpus/TARGET.  A crash, sanitizer
# report, timeout or broken invariant stops that target; the input is saved
# under fuzz/build/artifacts/ and the run exits non-zero.  Per target one
# summary line:  TARGET: N runs in S s, exit RC (log: PATH)   (S: elapsed)
set -uo pipefail
cd "$(dirname "$0")"

ALL=(fuzz_vring_blk fuzz_vring_net fuzz_vring_packed fuzz_mem)
build=1
if [ "${1:-}" = "--no-build" ]; then
    build=0
    shift
fi
if [ "${1:-}" = "--repro" ]; then
    [ $build = 1 ] && { make -s all || exit 2; }
    status=0
    for t in "${ALL[@]}"; do
        for f in repro/"$t"/*; do
            [ -f "$f" ] || continue
            if VHD_FUZZ_STRICT=1 timeout 60 ./build/"$t" -timeout=20 "$f" >build/repro.log 2>&1; then
                echo "$f: ok"
            else
                echo "$f: FAILS: $(grep -a -m1 -E '==FUZZ INVARIANT==|ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error' build/repro.log)"
                status=1
            fi
        done
    done
    exit $status
fi

SECONDS_EACH=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")

if [ $build = 1 ]; then
    make -s all || exit 2
fi
mkdir -p build/artifacts
status=0
for t in "${targets[@]}"; do
    mkdir -p build/corpus/"$t"
    log=build/$t.log
    start=$(date +%s)
    ./build/"$t" build/corpus/"$t" corpus/"$t" \
        -max_total_time="$SECONDS_EACH" -timeout=10 -max_len=16384 -rss_limit_mb=4096 \
        -artifact_prefix=build/artifacts/"$t"- -print_final_stats=1 -seed="${FUZZ_SEED:-0}" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
    [ -n "$runs" ] || runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\)/\1/p' "$log" | tail -1)
    echo "$t: ${runs:-0} runs in $elapsed s, exit $rc (log: fuzz/$log)"
    if [ $rc -ne 0 ]; then
        grep -a -m3 -E '==FUZZ INVARIANT==|ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|SUMMARY|Test unit written' "$log" | sed 's/^/    /'
        status=1
    fi
done
exit $status
