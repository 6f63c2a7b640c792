#!/usr/bin/env bash
# Runs a job that must fail: passes when it exits non-zero within MAX_SECONDS and its output matches
# PATTERN (extended regex). Usage: expect_abort.sh MAX_SECONDS PATTERN -- COMMAND [ARGS...]
set -u
max=$1
pattern=$2
shift 2
[ "${1:-}" = -- ] && shift
start=$(date +%s)
out=$(timeout --kill-after=5 "$((max * 2))" "$@" 2>&1)
rc=$?
elapsed=$(($(date +%s) - start))
printf '%s\n' "$out"
echo "---- exit code $rc after ${elapsed} s"
fail() { echo "expect_abort: FAIL: $*"; exit 1; }
[ "$rc" -ne 0 ] || fail "expected a non-zero exit code"
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "the job hung (killed by timeout after $((max * 2)) s)"
[ "$elapsed" -le "$max" ] || fail "expected the job to end within $max s, took $elapsed s"
printf '%s\n' "$out" | grep -Eq -- "$pattern" || fail "expected output matching: $pattern"
echo "expect_abort: ok (non-zero exit in ${elapsed} s with the message)"
