#!/usr/bin/env bash
# `make unit`: the suite as two pytest processes, one per core. The tests marked `ray` (each starts a Ray session
# and its actors) run one after another in one process; everything else runs in the other. Both always run to the
# end; the exit status is non-zero if either failed. Usage: tools/run_tests.sh PYTEST [extra pytest args]
set -uo pipefail
pytest_bin=$1
shift
ray_log=$(mktemp /tmp/align-ray-tests.XXXXXX.log)
"$pytest_bin" -q -m ray --durations=15 -p no:cacheprovider "$@" >"$ray_log" 2>&1 &
ray_pid=$!
"$pytest_bin" -q -m "not ray" --durations=25 "$@"
rest=$?
wait "$ray_pid"
ray=$?
echo
echo "=========================== Ray tests (pytest -m ray) ==========================="
cat "$ray_log"
rm -f "$ray_log"
echo "not ray: exit $rest; ray: exit $ray"
# exit 5: the selection was empty (no test carries or lacks the marker), which is not a failure
[[ $rest -eq 0 || $rest -eq 5 ]] && [[ $ray -eq 0 || $ray -eq 5 ]]
