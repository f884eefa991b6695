#!/usr/bin/env bash
# One command, fresh machine: set up .venv with the test extras, lint, run the whole pytest suite.
# pytest's "no tests collected" (exit 5) is a failure here, never a silent pass.
source "$(dirname "$0")/_env.sh" test
cd "$REPO"
"$PY" -m ruff check .
set +e
# two workers on the two CI cores (whole test files per worker: module fixtures stay in one process), one
# BLAS/OpenMP thread each so they do not oversubscribe; VOCOSLICER_TEST_WORKERS=0 runs serially
WORKERS="${VOCOSLICER_TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
  "$PY" -m pytest "$@"
else
  OMP_NUM_THREADS=1 "$PY" -m pytest -n "$WORKERS" --dist loadfile "$@"
fi
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
