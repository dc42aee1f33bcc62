#!/usr/bin/env bash
# `make test`'s runner: the two vitest projects of vitest.config.ts as two processes side by side,
# so the guests of test/vm (single-threaded TCG: one core) run while the host tests (mostly waiting
# on fsync, loop devices and child processes) use the other core. Each line of output is prefixed
# with its lane ("vm   |", "host |"); at the end each lane's result, and the failures of a failed
# lane once more, unmixed. Exit status: 0 when both lanes passed, else 1.
#   scripts/test.sh [VITEST_ARGS...]   extra arguments go to both vitest runs (a file filter, -t NAME,
#                                      --bail=1); with any, a lane that has no matching file passes
# ULOB_TEST_SCALE (test/support/scale.ts) scales the model and fuzz repetitions; `make test-long`
# sets 1, the full counts. ULOB_TEST_LOGS=DIR keeps each lane's log (DIR/vm.log, DIR/host.log) and
# vitest's JSON report with every file's and test's duration (DIR/vm.json, DIR/host.json).
set -uo pipefail
cd "$(dirname "$0")/.."

logs=${ULOB_TEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/ulob-test.XXXXXX")}
mkdir -p "$logs"
[ -t 1 ] && export FORCE_COLOR=1

start=$(date +%s)
extra=()
[ $# -gt 0 ] && extra=(--passWithNoTests)
lane() {
  local name=$1 tag
  shift
  tag=$(printf '%-4s |' "$name")
  {
    local t0=$SECONDS
    local json=()
    [ -n "${ULOB_TEST_LOGS:-}" ] && json=(--reporter=default --reporter=json --outputFile.json="$logs/$name.json")
    # The host lane at nice 10: the guests' checks count seconds of guest time (io_timeout_s,
    # hung-task and soft-lockup watchdogs), so their single TCG thread goes first when the two lanes
    # want more than the machine has; the host tests only wait longer.
    local nice=()
    [ "$name" = host ] && nice=(nice -n 10)
    "${nice[@]}" npx vitest run --project "$name" "${json[@]}" "${extra[@]}" "$@" 2>&1
    echo "$? $((SECONDS - t0))" >"$logs/$name.rc"
  } | tee "$logs/$name.log" | sed -u "s/^/$tag /"
}

# Each lane in its own process group, so that Ctrl-C or a CI timeout stops all of it.
set -m
trap 'kill -TERM -- -$vm -$host 2>/dev/null; wait; exit 130' INT TERM
lane vm "$@" &
vm=$!
lane host "$@" &
host=$!
wait $vm $host
set +m

status=0
echo
echo "== make test: both lanes done in $(($(date +%s) - start)) s (logs in $logs)"
for name in vm host; do
  read -r rc secs <"$logs/$name.rc" 2>/dev/null || { rc=1; secs='?'; }
  if [ "$rc" = 0 ]; then
    echo "== $name lane: passed in $secs s"
  else
    status=1
    echo "== $name lane: FAILED (vitest exit $rc) after $secs s; its failures:"
    # From vitest's failure report to the end (its summary), without colour codes; when vitest
    # itself died before it reported, the lane's last lines.
    report=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/$name.log" | awk '/(Failed Tests|Failed Suites|Unhandled Errors?) [0-9]+|Unhandled Rejection/ { on = 1 } on')
    [ -n "$report" ] || report=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/$name.log" | tail -40)
    printf '%s\n' "$report" | sed "s/^/$name | /"
  fi
done
[ -n "${ULOB_TEST_LOGS:-}" ] || [ $status != 0 ] || rm -rf "$logs"
exit $status
