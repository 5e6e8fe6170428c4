#!/usr/bin/env bash
# Build and verify the app's on-device model for one target, exactly as the app's CI does: the workflow
# (github-actions.yml) runs this script once per target, and so can anyone on their own machine.
#
#   MODEL=models/classifier.pth ARCH=mobilenet_v2 CALIB=ml/calibration EVAL=ml/labelled \
#       examples/ci/build-model.sh android-arm64
#
# Exit code: edgekit's (0 built and verified, 1 a gate failed, 2 bad input, 3 a stage failed), so a gate that
# fails fails the job. The one-line summary goes to stdout and, under GitHub Actions, to the job summary.
set -uo pipefail

target=${1:?usage: build-model.sh TARGET  (MODEL, ARCH, CALIB, EVAL, RECIPE, PRECISION, EFFORT, OUT from the environment)}
edgekit=${EDGEKIT:-edgekit}
out=${OUT:-dist}/$target
args=(build "${MODEL:-mobilenet_v2}" --target "$target" --out "$out" --quiet)
[[ -n ${ARCH:-} ]] && args+=(--arch "$ARCH")
[[ -n ${CALIB:-} ]] && args+=(--calib "$CALIB")
[[ -n ${EVAL:-} ]] && args+=(--eval "$EVAL")
[[ -n ${RECIPE:-} ]] && args+=(--recipe "$RECIPE")
[[ -n ${PRECISION:-} ]] && args+=(--precision "$PRECISION")
[[ -n ${EFFORT:-} ]] && args+=(--effort "$EFFORT")  # fast: a quicker build for pull requests, at a stated cost

log=$(mktemp)
summary=$("$edgekit" "${args[@]}" 2>"$log")
code=$?
cat "$log" >&2
reason=$(grep -h '^edgekit:' "$log" | tail -n 1)
rm -f "$log"
case $code in
  0) verdict="built and verified" ;;
  1) verdict="a gate failed: $reason" ;;
  *) verdict="failed (exit $code): $reason" ;;
esac
line="$target: $verdict${summary:+ | $summary}"
echo "$line"
if [[ -n ${GITHUB_STEP_SUMMARY:-} ]]; then
  echo "- $line" >> "$GITHUB_STEP_SUMMARY"
fi
exit $code
