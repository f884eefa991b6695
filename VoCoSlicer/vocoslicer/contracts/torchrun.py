"""The ``torch.distributed.run`` (torchrun) command line that runs an engine command on every rank.

The engine relaunches itself with it (``--gpus N``) and prints it (``--print-torchrun``); the Slicer side shows
the same command for a terminal or a cluster job script. Built once here, the two cannot disagree on the
rendezvous options.
"""

from __future__ import annotations

import os
import sys


def torchrun_command(module_args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int | str = 0,
                     master_addr: str = "127.0.0.1", master_port: int | str = 29500,
                     python: str | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m <module_args>``.

    One node uses the standalone rendezvous (free port, no address needed); several nodes use a static master
    address/port that every node is given with its own ``--node_rank``. ``node_rank`` and ``master_addr`` may be
    shell variables (``"$NODE_RANK"``) for a job script that runs on each node; ``python`` defaults to this
    interpreter.
    """
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={int(nproc_per_node)}"]
    if nnodes <= 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={int(nnodes)}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    return [*cmd, "-m", *module_args]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def env_rank() -> int:
    """This process's global rank as torchrun announces it (``RANK``; 0 outside torchrun).

    For what must be decided before (or without) a process group: whose events file to append to, which shard of
    a batch to take, which rank writes a summary. Inside training the trainer's ``DistContext`` is the answer.
    """
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """Processes in this torchrun job (``WORLD_SIZE``; 1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def under_torchrun() -> bool:
    """Whether torchrun started this process (its children must never relaunch themselves)."""
    return "WORLD_SIZE" in os.environ
