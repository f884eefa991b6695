"""``--config FILE.yaml`` / ``--print-config`` of finetune, pretrain voco|tokenizer|mim and segment.

The parse tests run the real CLI parser (``cli.build_parser`` + ``config.parse_args``); the run.json test runs a
real zero-step ``pretrain voco`` job on a small phantom; one bad file goes through ``python -m vocoslicer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vocoslicer import config
from vocoslicer.cli import build_parser, main
from vocoslicer.jobs import read_run


def parse(*argv: str):
    return config.parse_args(build_parser(), list(argv))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


FINETUNE = """\
cohort: /data/cohort
init: scratch
out: /runs/ft
steps: 5
lr: 1e-4          # PyYAML reads this as text; float() takes it like the flag does
semi: false
semi_start: 0.25  # '_' and '-' both name the option
roi: [32, 32, 16]
sampler: posneg
no-install: true
preprocessing: {spacing: [1.5, 1.5, 2]}  # a mapping for a one-value option: its JSON text
"""


def test_file_values_are_used_and_flags_override(tmp_path: Path) -> None:
    cfg = write(tmp_path / "ft.yaml", FINETUNE)
    args = parse("finetune", "--config", str(cfg))
    assert (args.cohort, args.init, args.out, args.steps, args.lr) == ("/data/cohort", "scratch", "/runs/ft", 5, 1e-4)
    assert args.semi is False and args.semi_start == 0.25 and args.roi == [32, 32, 16] and args.no_install is True
    assert json.loads(args.preprocessing) == {"spacing": [1.5, 1.5, 2]}
    assert args.sampler == "posneg" and args.batch == 2  # untouched options keep the parser's defaults
    assert args.config == str(cfg.resolve()) and args.config_sha256 == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert not hasattr(args, "print_config")
    # flags win, wherever they stand relative to --config; booleans can be switched back by the flag
    args = parse("finetune", "--steps", "7", "--config", str(cfg), "--semi", "--roi", "64", "--cohort", "/other")
    assert (args.steps, args.semi, args.roi, args.cohort, args.lr) == (7, True, [64, 64, 64], "/other", 1e-4)
    # nargs="+" and the --no- form of a BooleanOptionalAction; JSON works too
    voco = write(tmp_path / "voco.json", json.dumps({"data": ["/a", "/b"], "grad-ckpt": True, "size": "L",
                                                       "cache_dir": "/cache", "steps": 10}))
    args = parse("pretrain", "voco", "--config", str(voco), "--steps", "3")
    assert args.data == ["/a", "/b"] and args.grad_ckpt is True and args.size == "L" and args.steps == 3
    assert args.cache_dir == Path("/cache")  # through the action's type, like the flag
    assert parse("pretrain", "voco", "--config", str(voco), "--data", "/c").data == ["/c"]
    tok = write(tmp_path / "tok.yaml", "data: /only\n")  # one value for nargs="+": a list of one
    assert parse("pretrain", "tokenizer", "--config", str(tok)).data == ["/only"]
    negative = write(tmp_path / "ft2.yaml", "no-semi: true\ncohort: c\ninit: scratch\nout: o\n")
    assert parse("finetune", "--config", str(negative)).semi is False
    seg = write(tmp_path / "seg.yaml", "output: /o/seg.nii.gz\nfast: true\noverlap: 0.25\n")
    args = parse("segment", "ct.nii.gz", "--config", str(seg))
    assert (args.input, args.output, args.fast, args.overlap) == ("ct.nii.gz", "/o/seg.nii.gz", True, 0.25)


def test_required_options_still_required_without_file_and_commands_without_config(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("finetune", "--init", "scratch", "--out", "o")
    assert exc.value.code == 2 and "--cohort" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parse("phantom", "--config", "x.yaml")  # a command that did not opt in has no --config
    assert exc.value.code == 2


def _print_config(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--print-config"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_print_config_round_trip(tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path / "ft.yaml", FINETUNE.replace("/runs/ft", str(tmp_path / "ft-run")))
    printed = _print_config(capsys, "--run-dir", str(tmp_path / "R"), "finetune", "--config", str(cfg),
                            "--lr", "0.01", "--ssl-weight", "0.5")
    assert not (tmp_path / "R").exists() and not (tmp_path / "ft-run").exists()  # printed, nothing run
    assert "lr: 0.01\n" in printed and "roi: [32, 32, 16]\n" in printed and "semi-start: 0.25\n" in printed
    again = write(tmp_path / "printed.yaml", printed)
    assert _print_config(capsys, "finetune", "--config", str(again)) == printed
    first = vars(parse("finetune", "--config", str(cfg), "--lr", "0.01", "--ssl-weight", "0.5"))
    second = vars(parse("finetune", "--config", str(again)))
    assert {k: v for k, v in first.items() if not k.startswith("config")} == \
        {k: v for k, v in second.items() if not k.startswith("config")}
    # a starting file for every command: unset required options are printed as null and read back as unset
    for cmd in (["finetune"], ["pretrain", "voco"], ["pretrain", "tokenizer"], ["pretrain", "mim"],
                ["segment", "ct.nii.gz"]):
        template = _print_config(capsys, *cmd)
        path = write(tmp_path / f"{cmd[-1]}.yaml", template)
        assert _print_config(capsys, *cmd, "--config", str(path)) == template


BAD = {
    "missing": (None, "no such file"),
    "directory": ("<dir>", "cannot read"),
    "not_utf8": (b"\xff\xfe\x00steps", "UTF-8"),
    "bad_yaml": ("steps: [1, 2\n", "invalid YAML at line"),
    "bad_json": ("{\"steps\": }", "invalid JSON at line 1"),
    "top_list": ("- steps\n- 5\n", "got a list"),
    "empty": ("", "got empty"),
    "unknown": ("stepz: 5\n", "'stepz' is not an option of 'vocoslicer pretrain voco' (did you mean 'steps'?)"),
    "wrong_int": ("steps: many\n", "invalid int value 'many'"),
    "float_for_int": ("steps: 5.5\n", "invalid int value '5.5'"),
    "text_for_bool": ("compile: yes please\n", "expects true or false"),
    "int_for_bool": ("grad-ckpt: 1\n", "expects true or false"),
    "bad_choice": ("size: XL\n", "invalid choice 'XL'"),
    "null_with_default": ("steps: null\n", "cannot be null"),
    "empty_nargs": ("data: []\n", "at least one value"),
    "twice": ("cache-dir: /a\ncache_dir: /b\n", "sets the same option as 'cache-dir'"),
    "config_key": ("config: other.yaml\n", "cannot be set in a config file"),
    "job_option": ("run-dir: /r\n", "is not an option"),
    "nested": ("lr: [[1]]\n", "expects one value"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_with_one_line_and_creates_nothing(tmp_path: Path, capsys, case: str) -> None:
    content, expected = BAD[case]
    path = tmp_path / ("c.json" if case == "bad_json" else "c.yaml")
    if content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    run_dir, out = tmp_path / "R", tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(run_dir), "pretrain", "voco", "--data", str(tmp_path), "--out", str(out),
              "--config", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("vocoslicer: error: --config ") and expected in err, err
    assert not run_dir.exists() and not out.exists()


def test_bad_config_from_the_real_command_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "- not a mapping\n")
    proc = subprocess.run([sys.executable, "-m", "vocoslicer", "--run-dir", str(tmp_path / "R"), "finetune",
                           "--config", str(bad)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "VOCOSLICER_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "expected a mapping" in proc.stderr and not (tmp_path / "R").exists()


def test_run_json_holds_the_resolved_config(tmp_path: Path, monkeypatch) -> None:
    from vocoslicer.data.phantom import generate_phantom, write_phantom

    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    write_phantom(generate_phantom(0, spacing=(6, 6, 6), size=(48, 48, 32)), data)
    cfg = write(tmp_path / "voco.yaml", f"""\
data: [{data}]
steps: 50           # overridden by --steps 0 below
feature-size: 12
crop: 32
depth: 64
grid: 2
sw: 1
batch: 1
workers: 0
spacing: "6"
cache-dir: {tmp_path / "cache"}
device: cpu
""")
    run_dir = tmp_path / "R"
    monkeypatch.setattr(sys, "argv", ["vocoslicer", "--run-dir", str(run_dir), "pretrain", "voco", "--config",
                                      str(cfg), "--steps", "0"])
    assert main(sys.argv[1:]) == 0
    run = read_run(run_dir)
    assert run["status"] == "ok" and (run_dir / "backbone" / "model.json").is_file()
    resolved = run["config"]
    assert resolved["steps"] == 0 and resolved["feature_size"] == 12 and resolved["crop"] == 32
    assert resolved["data"] == [str(data)] and resolved["cache_dir"] == str(tmp_path / "cache")
    assert resolved["lr"] == 1e-4 and resolved["size"] == "B"  # options the file left alone: their defaults
    assert resolved["config"] == str(cfg.resolve())
    assert resolved["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert "print_config" not in resolved and "_config_parser" not in resolved


def test_yaml_without_pyyaml_is_one_line_and_json_still_works(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # what a Python without PyYAML gives: ImportError on import
    with pytest.raises(SystemExit) as exc:
        parse("pretrain", "voco", "--config", str(write(tmp_path / "c.yaml", "steps: 5\n")))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "PyYAML" in err
    assert parse("pretrain", "voco", "--config", str(write(tmp_path / "c.json", '{"steps": 5}'))).steps == 5
