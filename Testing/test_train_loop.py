"""Shared training loop: learning, exact resume, early stop, cancel by signal, AMP paths, DDP under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vocoslicer.errors import Cancelled, UserError
from vocoslicer.jobs.events import EventSink
from vocoslicer.train.loop import TrainConfig, Trainer
from vocoslicer.train.schedule import warmup_cosine_factor
from vocoslicer.train.state import load_checkpoint

HERE = Path(__file__).parent
TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


class RandomBatches:
    """An iterable of random batches drawn from the global torch RNG (so RNG restore reproduces the data)."""

    def __init__(self, n: int = 4, batch: int = 8) -> None:
        self.n, self.batch = n, batch

    def __iter__(self):
        for _ in range(self.n):
            x = torch.randn(self.batch, 4)
            yield {"x": x, "y": x @ TRUE_W.T + 0.01 * torch.randn(self.batch, 1)}


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))


def mse_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    pred = model(batch["x"])
    loss = torch.nn.functional.mse_loss(pred.float(), batch["y"])
    return loss, {"mse": loss.detach()}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_schedule_matches_official_warmup_cosine():
    assert warmup_cosine_factor(0, 10, 100) == 0.0
    assert warmup_cosine_factor(5, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, 100) == pytest.approx(0.0)


def test_tiny_model_learns_and_reports(tmp_path):
    cfg = TrainConfig(steps=60, lr=2e-2, warmup_steps=5, log_every=10, ckpt_every=25, device="cpu")
    tr = Trainer(tiny_model(), cfg, tmp_path, mse_step, RandomBatches(), events=EventSink(tmp_path / "ev.jsonl"))
    res = tr.fit()
    assert res["step"] == 60 and res["stopped"] == "done"
    train = [h for h in res["history"] if h["split"] == "train"]
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]
    ev = _events(tmp_path / "ev.jsonl")
    metrics = [e for e in ev if e["kind"] == "metric"]
    assert {"loss", "lr", "steps_per_s", "mse"} <= set(metrics[0]) and metrics[0]["split"] == "train"
    prog = [e for e in ev if e["kind"] == "progress"]
    assert prog[-1]["step"] == 60 and prog[-1]["total"] == 60 and prog[-1]["eta_s"] == 0
    assert [e["step"] for e in ev if e["kind"] == "artifact"] == [25, 50, 60]
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["step"] == 60 and set(ck["rng"][0]) == {"python", "numpy", "torch", "cuda"}


def test_cancel_then_resume_is_exact(tmp_path):
    cfg = TrainConfig(steps=20, lr=1e-2, warmup_steps=3, log_every=5, ckpt_every=100, device="cpu")
    ref = Trainer(tiny_model(), cfg, tmp_path / "ref", mse_step, RandomBatches())
    ref.fit()

    a = Trainer(tiny_model(), cfg, tmp_path / "run", mse_step, RandomBatches(), should_stop=lambda: a.step >= 9)
    with pytest.raises(Cancelled):
        a.fit()
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 9
    b = Trainer(tiny_model(seed=123), cfg, tmp_path / "run", mse_step, RandomBatches())
    b.fit(resume=True)
    assert b.step == 20
    assert torch.equal(_flat(b.model), _flat(ref.model))
    sa, sb = ref.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        assert int(sa[k]["step"]) == int(sb[k]["step"]) == 20
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
        assert torch.equal(sa[k]["max_exp_avg_sq"], sb[k]["max_exp_avg_sq"])  # amsgrad like the official code
    assert b.scheduler.last_epoch == ref.scheduler.last_epoch == 20


def test_early_stop_and_on_best(tmp_path):
    values = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9])
    best_calls = []
    cfg = TrainConfig(steps=100, eval_every=2, early_stop_patience=3, select_metric="val_dice", device="cpu",
                      log_every=50)
    tr = Trainer(tiny_model(), cfg, None, mse_step, RandomBatches(),
                 eval_fn=lambda m, s: {"val_dice": next(values)},
                 on_best=lambda m, s, metrics: best_calls.append((s, metrics["val_dice"])))
    res = tr.fit()
    assert res["stopped"] == "early_stop" and res["step"] == 10
    assert res["best"] == 0.7 and res["best_step"] == 4
    assert best_calls == [(2, 0.5), (4, 0.7)]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_accumulation_on_cpu(tmp_path, amp):
    cfg = TrainConfig(steps=4, amp=amp, grad_accum=2, grad_clip=1.0, device="cpu", log_every=2)
    tr = Trainer(tiny_model(), cfg, tmp_path, mse_step, RandomBatches(n=3))
    before = _flat(tr.model).clone()
    res = tr.fit()
    assert res["step"] == 4 and tr.epoch >= 2  # 8 batches from a 3-batch iterable: re-iterated
    assert not torch.equal(before, _flat(tr.model))
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ck["scaler"] is not None) == (amp == "fp16")


def test_compile_failure_falls_back_to_eager(tmp_path):
    cfg = TrainConfig(steps=2, compile=True, compile_backend="no_such_backend", device="cpu")
    tr = Trainer(tiny_model(), cfg, None, mse_step, RandomBatches(), events=EventSink(tmp_path / "ev.jsonl"))
    assert tr.fit()["step"] == 2
    assert any(e["kind"] == "warning" and "compile" in e["message"] for e in _events(tmp_path / "ev.jsonl"))


def test_empty_data_is_a_user_error():
    with pytest.raises(UserError):
        Trainer(tiny_model(), TrainConfig(steps=1, device="cpu"), None, mse_step, []).fit()


def test_sigterm_saves_checkpoint_and_exits_cancelled(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), "sigterm", str(tmp_path)], env=env)
    ev = tmp_path / "events.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (ev.exists() and '"progress"' in ev.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 3
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["step"] >= 1
    b = Trainer(tiny_model(), TrainConfig(steps=ck["step"] + 2, device="cpu"), tmp_path, mse_step, RandomBatches())
    assert b.fit(resume=True)["step"] == ck["step"] + 2


def test_ddp_two_gloo_ranks_end_with_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), "ddp", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == r1[0] == "6"
    assert r0[1] == r1[1]  # different init and data per rank, DDP keeps them identical
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 6 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    ev = _events(tmp_path / "run" / "events.jsonl")
    assert sum(e["kind"] == "progress" and e["step"] == 6 for e in ev) == 1  # only rank 0 reports


def _child_main() -> int:
    """Child process entry: ``python test_train_loop.py MODE OUTDIR`` (MODE: ddp | sigterm)."""
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "ddp":
        rank = int(os.environ["RANK"])
        cfg = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, ckpt_every=3, log_every=2, device="cpu", grad_accum=2)
        tr = Trainer(tiny_model(seed=rank), cfg, out / "run", mse_step, RandomBatches(),
                     events=EventSink(out / "run" / "events.jsonl"))
        res = tr.fit()
        flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        (out / f"rank{rank}.txt").write_text(
            f"{res['step']} {hashlib.sha256(flat.numpy().tobytes()).hexdigest()}\n")
        return 0
    if mode == "sigterm":
        def slow_step(model, batch):
            time.sleep(0.05)
            return mse_step(model, batch)

        cfg = TrainConfig(steps=100000, ckpt_every=1000, log_every=1, device="cpu")
        tr = Trainer(tiny_model(), cfg, out, slow_step, RandomBatches(), events=EventSink(out / "events.jsonl"))
        try:
            tr.fit()
        except Cancelled:
            return 3
        return 0
    return 2



if __name__ == "__main__":
    sys.exit(_child_main())
