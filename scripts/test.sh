#!/usr/bin/env bash
# One command, fresh machine: set up .venv with the test extras, lint, run the whole pytest suite.
# pytest's "no tests collected" (exit 5) is a failure here, never a silent pass.
source "$(dirname "$0")/_env.sh" test
cd "$REPO"
"$PY" -m ruff check .
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
