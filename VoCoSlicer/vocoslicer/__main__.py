"""``python -m vocoslicer``: the one entry point the Slicer modules spawn."""

from vocoslicer.cli import main

raise SystemExit(main())
