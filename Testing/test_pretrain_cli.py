"""The three ``pretrain`` methods share one set of flags, one torchrun relauncher and the recipes' defaults."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import pytest

from vocoslicer import config
from vocoslicer.cli import build_parser, main
from vocoslicer.commands.pretrain.common import LAUNCH_OPTIONS, child_argv
from vocoslicer.train.recipes import MIM, TOKENIZER, VOCO

METHODS = {"voco": VOCO, "tokenizer": TOKENIZER, "mim": MIM}


def _method_parser(method: str):
    top = build_parser()
    pretrain = next(a for a in top._actions if a.dest == "command").choices["pretrain"]
    return next(a for a in pretrain._actions if a.dest == "method").choices[method]


@pytest.mark.parametrize("method", ["tokenizer", "mim"])
def test_print_torchrun_multi_node(monkeypatch, capsys, method: str) -> None:
    argv = ["pretrain", method, "--data", "/d", "--out", "/r", "--gpus", "4", "--nnodes", "2", "--node-rank=1",
            "--master-addr", "10.0.0.1", "--master-port=29600", "--print-torchrun", "--steps", "5"]
    if method == "mim":
        argv += ["--tokenizer", "/tok"]
    monkeypatch.setattr(sys, "argv", ["vocoslicer", *argv])
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    cmd = shlex.split(lines[0])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=2", "--node_rank=1",
                       "--master_addr=10.0.0.1", "--master_port=29600", "-m", "vocoslicer", "pretrain", method,
                       "--data", "/d", "--out", "/r", "--steps", "5", *(["--tokenizer", "/tok"] * (method == "mim"))]
    assert not any(a.split("=")[0] in LAUNCH_OPTIONS for a in cmd[cmd.index("vocoslicer"):])
    assert lines[1].startswith("# run on every node") and "10.0.0.1" in lines[1]


def test_child_argv_drops_launcher_options_in_both_spellings() -> None:
    argv = ["--run-dir", "R", "pretrain", "voco", "--gpus=2", "--nnodes", "3", "--print-torchrun", "--steps", "1",
            "--master-port", "1", "--node-rank", "0", "--master-addr=h"]
    assert child_argv(argv) == ["--run-dir", "R", "pretrain", "voco", "--steps", "1"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_accum_and_cache_dir_on_every_method(method: str) -> None:
    extra = ["--tokenizer", "/t"] if method == "mim" else []
    args = config.parse_args(build_parser(), ["pretrain", method, "--data", "/d", "--grad-accum", "3", "--cache-dir",
                                              "/c", *extra])
    assert args.grad_accum == 3 and args.cache_dir == Path("/c")
    assert not hasattr(args, "accum") and not hasattr(args, "cache")
    assert args.amp == "auto" and _method_parser(method)._option_string_actions["--amp"].choices == (
        "auto", "bf16", "fp16", "off")


@pytest.mark.parametrize("method", ["tokenizer", "mim"])
def test_old_cache_spelling_is_a_hidden_alias(method: str, capsys) -> None:
    args = config.parse_args(build_parser(), ["pretrain", method, "--data", "/d", "--cache", "/old"])
    assert args.cache_dir == Path("/old")
    with pytest.raises(SystemExit):
        main(["pretrain", method, "--help"])
    out = capsys.readouterr().out
    assert "--cache-dir" in out and "--cache " not in out and "[--cache]" not in out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parser_defaults_are_the_recipe_values(method: str) -> None:
    recipe = METHODS[method]
    p = _method_parser(method)
    dests = {a.dest for a in p._actions}
    shared = [f.name for f in dataclasses.fields(recipe) if f.name in dests and f.name != "spacing"]  # text flag
    assert {"steps", "batch", "lr", "weight_decay", "seed", "workers", "grad_accum", "crop", "size"} <= set(shared)
    for name in shared:
        assert p.get_default(name) == getattr(recipe, name), name
    if method == "voco":
        assert p.get_default("spacing") == "1.5" and p.get_default("window") == "-175,250"
        from vocoslicer.commands.pretrain.voco import _triplet, _window

        assert _triplet(p.get_default("spacing"), "--spacing") == (VOCO.spacing,) * 3
        assert _window(p.get_default("window")) == (VOCO.a_min, VOCO.a_max)


def test_training_dataclasses_read_the_same_recipe_values() -> None:
    from vocoslicer.data.cache import PreprocessConfig
    from vocoslicer.ssl import pumit as P
    from vocoslicer.train.pretrain_pumit import TokenizerRecipe
    from vocoslicer.train.pretrain_voco import VoCoRecipe

    voco = VoCoRecipe()
    assert (voco.size, voco.roi, voco.grid, voco.sw, voco.batch, voco.workers) == (
        VOCO.size, VOCO.crop, VOCO.grid, VOCO.sw, VOCO.batch, VOCO.workers)
    pp = PreprocessConfig()
    assert (pp.spacing, pp.a_min, pp.a_max, pp.dtype) == ((1.5,) * 3, -175.0, 250.0, "int16")
    tok = TokenizerRecipe()
    assert (tok.quant_weight, tok.entropy_weight, tok.d_lr, tok.perceptual) == (
        TOKENIZER.quant_weight, TOKENIZER.entropy_weight, TOKENIZER.d_lr, TOKENIZER.perceptual)
    assert P.MASK_RATIO == MIM.mask_ratio == 0.55
    assert VOCO.warmup_steps(100_000) == 5000 and VOCO.warmup_steps(15) == 1
    assert TOKENIZER.warmup_steps(1000) == 50 and MIM.warmup_steps(300_000) == 10_000


def test_old_voco_accum_spelling_is_a_hidden_alias(capsys) -> None:
    """``pretrain voco --accum`` (its name before every command said --grad-accum) still works, unlisted."""
    args = config.parse_args(build_parser(), ["pretrain", "voco", "--data", "/d", "--accum", "4"])
    assert args.grad_accum == 4 and not hasattr(args, "accum")
    with pytest.raises(SystemExit):
        main(["pretrain", "voco", "--help"])
    out = capsys.readouterr().out
    assert "--grad-accum" in out and "--accum" not in out
