#!/usr/bin/env bash
# `make test`'s runner: both cores busy from start to end.
# - host: the host project of vitest.config.ts (unit, model, integration) in one vitest process at
#   nice 10, two files at a time (ULOB_HOST_WORKERS, default 2), longest first by
#   scripts/test-times.txt (vitest.config.ts's sequencer), beside
# - vm1: a worker that takes test/vm files one at a time from a queue, longest first (the measured
#   seconds in scripts/test-times.txt; a file not listed there counts as long, so it starts early),
#   each in its own `vitest run --project vm FILE`: one guest (single-threaded TCG, one core).
# - pkg: the host files of SIDE_FILES (below) in a vitest of their own, also at nice 10, from the
#   start beside the other two; the host lane runs without them.
# - When the first of the pkg and host lanes is done (pkg, ~630 s in), its process becomes a second
#   VM worker (vm2) on the same queue, so two guests run side by side for the rest of the run; the
#   other lane just ends. Never more than two guests: each is one single-threaded TCG core, and the
#   guests' checks count seconds of guest time, which a third guest on 2 cores would stretch.
# Each line of output is prefixed with its lane ("host |", "pkg  |", "vm1  |", "vm2  |"); at the end each
# lane's result, every VM file's time, and the failures of whatever failed once more, unmixed.
# Exit status: 0 when every file passed, else 1.
#   scripts/test.sh [VITEST_ARGS...]   with arguments (a file filter, -t NAME, --bail=1): the two
#                                      projects as two plain vitest runs with those arguments, no
#                                      queue; a lane that has no matching file passes
# ULOB_TEST_SCALE (test/support/scale.ts) scales the model and fuzz repetitions; `make test-long`
# sets 1, the full counts. ULOB_TEST_LOGS=DIR keeps the logs: DIR/host.log, DIR/vm1.log, DIR/vm2.log,
# one DIR/vm/NAME.log per VM file, DIR/vm-times.txt and DIR/host-times.txt (each file's seconds, in
# the format of scripts/test-times.txt: copy them there after a clean-clone run to refresh the
# order) and vitest's JSON reports with every test's duration (DIR/host.json, DIR/vm/NAME.json).
set -uo pipefail
cd "$(dirname "$0")/.."

logs=${ULOB_TEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/ulob-test.XXXXXX")}
mkdir -p "$logs/vm"
[ -t 1 ] && export FORCE_COLOR=1

start=$(date +%s)
# Host files that mostly wait (downloads, debootstrap, dpkg in a chroot) and take long: package.test
# was 1531 s of the host lane's 2432 s in a clean-clone run. Beside it in a lane of their own they
# cost the host lane little CPU (267 CPU s of a 1203 s lane at load 6-12), and that lane is the
# first to end (~630 s in on a quiet machine): it becomes the second VM worker.
SIDE_FILES=(test/integration/package.test.ts)
# vitest itself, not through npx: npm's own start costs seconds per VM file under load.
vitest=(node_modules/.bin/vitest)
[ -x "${vitest[0]}" ] || vitest=(npx vitest)
prefix() { sed -u "s/^/$(printf '%-4s |' "$1") /"; }

# One vitest run of a whole project (the host lane; with arguments, the vm lane too).
lane() {
  local name=$1 project=$2
  shift 2
  local t0=$SECONDS json=() nice=() extra=()
  [ -n "${ULOB_TEST_LOGS:-}" ] && json=(--reporter=default --reporter=json --outputFile.json="$logs/$name.json")
  # With the user's filter a lane may have no file; the lanes of a whole run must have theirs.
  [ -n "${filtered:-}" ] && extra=(--passWithNoTests)
  # The host lane at nice 10: the guests' checks count seconds of guest time (io_timeout_s,
  # hung-task and soft-lockup watchdogs), so their single TCG thread goes first when the lanes
  # want more than the machine has; the host tests only wait longer.
  [ "$project" = host ] && nice=(nice -n 10)
  # Two host files at a time: most of the integration files wait (fsync, loop devices, child
  # processes), and the lane was the run's long pole at one file at a time (1943 s of a 1991 s
  # clean-clone run, 655 s of it CPU). Each file keeps to its own scratch, run directory, loop
  # devices and ports (test/support/cli.ts), as on a machine shared with other runs of the suite.
  [ "$name" = host ] && extra+=(--maxWorkers="${ULOB_HOST_WORKERS:-2}")
  local cpu cpu0
  cpu_now
  cpu0=$cpu
  "${nice[@]}" "${vitest[@]}" run --project "$project" "${json[@]}" "${extra[@]}" "$@" 2>&1 | tee "$logs/$name.log" | prefix "$name"
  local rc=${PIPESTATUS[0]} load
  cpu_now
  read -r load _ </proc/loadavg
  echo "$rc $((SECONDS - t0)) $((cpu - cpu0)) $load" >"$logs/$name.rc"
}

# The VM queue: every test/vm file (vitest.config.ts's vm include), longest first by
# scripts/test-times.txt ("SECONDS PATH" lines); unlisted files first of all (a new file's time is
# unknown: starting it early cannot leave it as the last long file of the run).
make_queue() {
  find test/vm -name '*.test.ts' | sort | awk -v unknown=100000 '
    NR == FNR { if ($1 ~ /^[0-9]+$/) t[$2] = $1; next }
    { print (($0 in t) ? t[$0] : unknown), $0 }' scripts/test-times.txt - |
    sort -k1,1nr -k2 | awk '{ print $2 }' >"$logs/vm.queue"
  echo 0 >"$logs/vm.next"
}

# Prints the next file of the queue (nothing when it is empty); the workers share it under a lock.
next_vm_file() {
  (
    flock 8
    local n f
    n=$(cat "$logs/vm.next")
    f=$(sed -n "$((n + 1))p" "$logs/vm.queue")
    [ -n "$f" ] && echo $((n + 1)) >"$logs/vm.next"
    echo "$f"
  ) 8>"$logs/vm.lock"
}

# CPU seconds (user + system) of this shell's waited-for children so far, in $cpu (clock ticks / 100:
# /proc/PID/stat's cutime and cstime; the comm field of a shell has no space). Daemons that detach
# from the test's process tree are not counted.
cpu_now() {
  local st
  read -r -a st <"/proc/$BASHPID/stat"
  cpu=$(((st[15] + st[16]) / 100))
}

# A VM worker: runs queue files one by one, each in its own vitest process, until the queue is empty.
# Appends "RC SECONDS FILE WORKER CPU LOAD" to $logs/vm.results for each file (CPU: seconds of CPU
# the file's processes used; LOAD: the 1-minute load average when it ended).
vm_worker() {
  local name=$1 f base t0 rc json cpu cpu0 load
  while f=$(next_vm_file) && [ -n "$f" ]; do
    base=$(basename "$f" .test.ts)
    t0=$SECONDS
    cpu_now
    cpu0=$cpu
    json=()
    [ -n "${ULOB_TEST_LOGS:-}" ] && json=(--reporter=default --reporter=json --outputFile.json="$logs/vm/$base.json")
    echo "== $f (queue: $(cat "$logs/vm.next") of $(wc -l <"$logs/vm.queue"))" | tee -a "$logs/$name.log" | prefix "$name"
    # A path under test/vm/ names one file only: every file name ends in .test.ts. --no-cache:
    # vitest's results cache (only its own file order) is one file that every run rewrites at its
    # end without a rename; a run starting meanwhile may read it empty and die.
    "${vitest[@]}" run --project vm --no-cache "${json[@]}" "$f" 2>&1 | tee "$logs/vm/$base.log" | tee -a "$logs/$name.log" | prefix "$name"
    rc=${PIPESTATUS[0]}
    cpu_now
    read -r load _ </proc/loadavg
    echo "$rc $((SECONDS - t0)) $f $name $((cpu - cpu0)) $load" >>"$logs/vm.results"
  done
}

# Called by the pkg and the host lane when they end: the first becomes the second VM worker (vm2).
second_vm_worker() {
  local first
  first=$( (
    flock 8
    [ -e "$logs/vm2.started" ] || { echo "$1" >"$logs/vm2.started"; echo yes; }
  ) 8>"$logs/vm.lock")
  [ "$first" = yes ] && vm_worker vm2
}

# Each lane in its own process group, so that Ctrl-C or a CI timeout stops all of it.
set -m
if [ $# -gt 0 ]; then
  filtered=1
  trap 'kill -TERM -- -$vm -$host 2>/dev/null; wait; exit 130' INT TERM
  lane vm vm "$@" &
  vm=$!
  lane host host "$@" &
  host=$!
  wait $vm $host
  lanes=(vm host)
else
  make_queue
  : >"$logs/vm.results"
  trap 'kill -TERM -- -$vm1 -$host -$pkg 2>/dev/null; wait; exit 130' INT TERM
  vm_worker vm1 &
  vm1=$!
  { lane pkg host "${SIDE_FILES[@]}"; second_vm_worker pkg; } &
  pkg=$!
  { ULOB_HOST_EXCLUDE=$(IFS=,; echo "${SIDE_FILES[*]}") lane host host; second_vm_worker host; } &
  host=$!
  wait $vm1 $host $pkg
  lanes=(host pkg)
fi
set +m

# From vitest's failure report to the end (its summary), without colour codes; when vitest itself
# died before it reported, the log's last lines.
failures() {
  local report
  report=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | awk '/(Failed Tests|Failed Suites|Unhandled Errors?) [0-9]+|Unhandled Rejection/ { on = 1 } on')
  [ -n "$report" ] || report=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | tail -40)
  printf '%s\n' "$report"
}

status=0
echo
echo "== make test: done in $(($(date +%s) - start)) s (logs in $logs)"
for name in "${lanes[@]}"; do
  read -r rc secs cpu load <"$logs/$name.rc" 2>/dev/null || { rc=1; secs='?'; }
  if [ "$rc" = 0 ]; then
    echo "== $name lane: passed in $secs s (CPU ${cpu:-?} s, load ${load:-?} at its end)"
  else
    status=1
    echo "== $name lane: FAILED (vitest exit $rc) after $secs s (CPU ${cpu:-?} s, load ${load:-?}); its failures:"
    failures "$logs/$name.log" | sed "s/^/$name | /"
  fi
done
if [ $# -eq 0 ]; then
  queued=$(wc -l <"$logs/vm.queue")
  ran=$(wc -l <"$logs/vm.results")
  failed=$(awk '$1 != 0' "$logs/vm.results" | wc -l)
  [ -e "$logs/vm2.started" ] && vm2from="; vm2 is the $(cat "$logs/vm2.started") lane's process from its end on"
  echo "== vm queue: $ran of $queued files run, $failed failed; seconds per file (worker, CPU s, 1-min load at its end)${vm2from:-}:"
  sort -k2,2nr "$logs/vm.results" | awk '{ printf "   %5d  %s  %s  (%s, CPU %s, load %s)\n", $2, ($1 == 0 ? "ok    " : "FAILED"), $3, $4, $5, $6 }'
  awk '{ print $2, $3 }' "$logs/vm.results" | sort -k1,1nr >"$logs/vm-times.txt"
  # Each host file's seconds from vitest's JSON report (the pkg lane's files too).
  for j in "$logs/host.json" "$logs/pkg.json"; do
    [ -s "$j" ] && node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      for (const f of r.testResults) console.log(Math.round((f.endTime - f.startTime) / 1000), require("path").relative(process.cwd(), f.name));' "$j"
  done | sort -k1,1nr >"$logs/host-times.txt"
  [ "$ran" = "$queued" ] && [ "$failed" = 0 ] || status=1
  while read -r rc secs f worker _; do
    [ "$rc" = 0 ] && continue
    echo "== $f: FAILED (vitest exit $rc, $worker) after $secs s; its failures:"
    failures "$logs/vm/$(basename "$f" .test.ts).log" | sed "s/^/vm   | /"
  done <"$logs/vm.results"
fi
[ -n "${ULOB_TEST_LOGS:-}" ] || [ $status != 0 ] || rm -rf "$logs"
exit $status
