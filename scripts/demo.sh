#!/usr/bin/env bash
# One command, fresh machine: set up .venv, generate a held-out phantom CT, segment it with the bundled demo
# model, write the segmentation next to it and print per-label Dice against the phantom's ground truth.
# Extra arguments go to `vocoslicer demo` (e.g. --device cuda, -o DIR, --seed N).
source "$(dirname "$0")/_env.sh" demo
exec "$PY" -m vocoslicer demo "$@"
