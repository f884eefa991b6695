# Shared set-up for scripts/demo.sh and scripts/test.sh: a project virtual environment in .venv with the engine
# installed editable and the tested pins (constraints-ci.txt: the CPU torch wheel). Re-running is cheap: the
# install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VOCOSLICER_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.vocoslicer-installed"
WANT="$(cat "$REPO/pyproject.toml" "$REPO/constraints-ci.txt" | sha256sum | cut -c1-16)-$1"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing the engine and its dependencies into $VENV (first run takes a minute or two)"
  "$PY" -m pip install -q --upgrade pip
  if [ "$1" = test ]; then EXTRA="[test]"; else EXTRA=""; fi
  "$PY" -m pip install -q -c "$REPO/constraints-ci.txt" -e "$REPO$EXTRA"
  if [ "$1" = test ]; then
    # the nnU-Net VoComni tests need dynamic-network-architectures; its declared timm pulls a torchvision that
    # does not match the CPU torch wheel, and PlainConvUNet imports neither, so install it alone
    "$PY" -m pip install -q --no-deps "dynamic-network-architectures==0.4.4"
  fi
  echo "$WANT" > "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# UTF-8 text I/O whatever the locale (CI has none): the engine's messages use "…" and "—", and tests read them
export PYTHONUTF8=1
