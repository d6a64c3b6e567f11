#!/usr/bin/env bash
# One CI build of one target, as the example workflow (.github/workflows/vlacompile.yml) runs it:
#
#   .ci/build-target.sh TARGET OUT [BASELINE_DIR] [-- extra vlacompile build args]
#
# Builds TARGET into OUT with --junit OUT/junit.xml (and --baseline BASELINE_DIR when that holds a
# report.json), then writes OUT/pr-comment.md: the diff against the baseline if there is one, else
# report.md. Exit 0 when the build passed or is unverified only because the latency is an estimate
# (exit 3: a Jetson target built on a runner without the device); the build's code otherwise.
set -uo pipefail
target=${1:?usage: build-target.sh TARGET OUT [BASELINE_DIR] [-- args]}; out=${2:?OUT}; shift 2
baseline=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then baseline=$1; shift; fi
[ "${1:-}" = "--" ] && shift
args=(build --target "$target" --out "$out" --junit "$out.junit.xml" --quiet)
if [ -n "$baseline" ] && [ -f "$baseline/report.json" ]; then args+=(--baseline "$baseline"); fi
vlacompile "${args[@]}" "$@"
code=$?
if [ -f "$out/report.json" ]; then
    mv "$out.junit.xml" "$out/junit.xml" 2>/dev/null || true
    if [ -n "$baseline" ] && [ -f "$baseline/report.json" ]; then
        vlacompile report diff "$baseline" "$out" --out "$out/pr-comment.md" >/dev/null || true
    else
        cp "$out/report.md" "$out/pr-comment.md"
    fi
fi
case $code in
    0|3) echo "ci: $target built (exit $code)"; exit 0 ;;
    *) echo "ci: $target failed (exit $code)"; exit "$code" ;;
esac
