#!/usr/bin/env bash
# `make unit`: the suite as two pytest processes, one per core. The tests marked `ray` (each starts a Ray session
# and its actors) run one after another in one process; everything else runs in the other, with the short Ray tests
# marked `ray_beside` to balance the two. Each process gets its own Ray temp dir (ALIGN_RAY_TMP), so their Ray
# sessions never meet. Both always run to the end; the exit status is non-zero if either failed.
# Usage: tools/run_tests.sh PYTEST [extra pytest args]
set -uo pipefail
pytest_bin=$1
shift
ray_log=$(mktemp /tmp/align-ray-tests.XXXXXX.log)
ray_tmp=$(mktemp -d /tmp/align-ray-a.XXXXXX)
beside_tmp=$(mktemp -d /tmp/align-ray-b.XXXXXX)
trap 'rm -rf "$ray_tmp" "$beside_tmp" "$ray_log"' EXIT
ALIGN_RAY_TMP=$ray_tmp "$pytest_bin" -q -m "ray and not ray_beside" --durations=15 -p no:cacheprovider "$@" \
    >"$ray_log" 2>&1 &
ray_pid=$!
ALIGN_RAY_TMP=$beside_tmp "$pytest_bin" -q -m "not ray or ray_beside" --durations=25 "$@"
rest=$?
wait "$ray_pid"
ray=$?
echo
echo "=================== Ray tests (pytest -m 'ray and not ray_beside') ==================="
cat "$ray_log"
echo "not ray (and ray_beside): exit $rest; ray: exit $ray"
# exit 5: the selection was empty (no test carries or lacks the marker), which is not a failure
[[ $rest -eq 0 || $rest -eq 5 ]] && [[ $ray -eq 0 || $ray -eq 5 ]]
