"""The contracts between the engine and its clients, in the standard library only.

Both sides of the process boundary read and write the same files and lines: run directories (``run.json``,
``events.jsonl``), JSON-lines events, labels CSV tables, the VoCoSlicer home folder, model ids and versions, the
dependency list, torchrun command lines and exit codes. Written once here, they cannot drift apart.

``VoCoSlicerLib`` (inside the Slicer process, which must never load torch, MONAI or SimpleITK) may import this
package and nothing else of the engine; ``Testing/test_contracts.py`` imports every module here with those
libraries blocked. So: no third-party import, and no import of another ``vocoslicer`` package, in this folder.
Nothing is imported here eagerly; use the submodules.
"""

MODULES = ("atomic", "dependencies", "errors", "events", "labels", "models", "paths", "rundir", "torchrun")
