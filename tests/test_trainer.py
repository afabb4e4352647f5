"""The shared training loop: schedule, resume after SIGKILL/SIGTERM, accumulation, frozen
parameters, best weights, and a 2-process (gloo) run equal to a 1-process one."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from cxpmrg_lib.trainer.sampler import _GlobalBatchSampler  # the data-order contract callers rely on
from cxpmrg_lib.trainer import (TrainConfig, TrainingInterrupted, build_optimizer, latest_checkpoint,
                                load_weights, lr_factor, optimizer_param_groups, read_metrics, save_weights,
                                total_steps_for, train)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) * 3 + 0.01 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def _mse(model, batch):
    x, y = batch
    err = model(x) - y
    return (err ** 2).mean(), {"mae": err.abs().mean()}


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=16, max_steps=40, lr=1e-2, warmup_steps=4, log_every=5, checkpoint_every=10,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


# Resume tests share one uninterrupted reference run (run A).
RESUME_CFG = dict(max_steps=40, log_every=1, checkpoint_every=10, keep_checkpoints=5)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    model = _mlp()
    run_dir = tmp_path_factory.mktemp("run_a")
    train(model, _data(), _mse, _cfg(**RESUME_CFG), run_dir)
    return _weights(model), read_metrics(run_dir)


_CHILD = """
import sys, time
sys.path.insert(0, {here!r})
from test_trainer import _data, _mlp, _mse, _cfg, RESUME_CFG
from cxpmrg_lib.trainer import TrainingInterrupted, train

calls = []

def slow(model, batch):  # slow from micro-step argv[2] on: the parent has time to send its signal
    calls.append(1)
    if len(calls) > int(sys.argv[2]):
        time.sleep(0.1)
    return _mse(model, batch)

try:
    r = train(_mlp(), _data(), slow, _cfg(**RESUME_CFG), sys.argv[1])
except TrainingInterrupted as e:
    print("INTERRUPTED", e.result.steps, flush=True)
    sys.exit(3)
print("FINISHED", flush=True)
"""


def _start_child(tmp_path: Path, run_dir: Path, slow_from: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(here=str(HERE)))
    return subprocess.Popen([sys.executable, str(script), str(run_dir), str(slow_from)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("child made no progress in time")
        time.sleep(0.02)


def test_trains_logs_and_follows_the_schedule(tmp_path):
    peak = 5e-2
    cfg = _cfg(max_steps=60, lr=peak, warmup_steps=5, min_lr_ratio=0.1, log_every=1, keep_checkpoints=2)
    model = _mlp()
    result = train(model, _data(), _mse, cfg, tmp_path, model_config={"hidden": 32})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 61))
    losses = [r["loss"] for r in rows]
    assert result.final_loss == losses[-1]
    assert sum(losses[-5:]) < sum(losses[:5]) / 20, losses  # measured: 5.70 -> 0.124 (46x)
    # 256 samples / 16 = 16 batches per epoch
    assert rows[15]["epoch"] == pytest.approx(1.0) and rows[-1]["epoch"] == pytest.approx(60 / 16)
    assert all(r["images_per_s"] > 0 and "mae" in r and "grad_norm" in r for r in rows)
    lr = [r["lr"] for r in rows]
    assert lr[0] == pytest.approx(0.2 * peak) and lr[2] == pytest.approx(0.6 * peak)
    assert lr[4] == pytest.approx(peak) and lr[5] == pytest.approx(peak)  # peak at the end of warm-up
    # cosine: half-way through the decay the factor is (1 + min) / 2; it never goes below the floor
    assert lr_factor(5 + 55 / 2, 60, 5, 0.1) == pytest.approx(0.55)
    assert lr_factor(60, 60, 5, 0.1) == pytest.approx(0.1) and lr_factor(90, 60, 5, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[5:], lr[6:])) and 0.1 * peak <= lr[-1] < 0.101 * peak
    assert all(v == pytest.approx(peak * lr_factor(i, 60, 5, 0.1)) for i, v in enumerate(lr))
    # files: pruned checkpoints, final weights with config, summary
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000050", "step_000060"]
    state = json.loads((tmp_path / "checkpoints" / "step_000060" / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["samples_seen"] == 60 * 16 and state["epoch"] == pytest.approx(3.75)
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"hidden": 32}
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 60 and summary["mixed_precision"] == "no"
    # a re-call returns at once with the trained weights, writing nothing
    again = _mlp(seed=5)
    assert not torch.equal(_weights(again), _weights(model))
    second = train(again, _data(), _mse, cfg, tmp_path)
    assert torch.equal(_weights(again), _weights(model)) and second.final_loss == result.final_loss
    assert len(read_metrics(tmp_path)) == 60


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference_run):
    ref_weights, ref_rows = reference_run
    run_dir = tmp_path / "run_b"
    child = _start_child(tmp_path, run_dir, slow_from=18)
    _wait_for(lambda: (run_dir / "checkpoints" / "step_000020" / "trainer_state.json").exists(), child)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    killed_at = max(r["step"] for r in read_metrics(run_dir))
    assert 20 <= killed_at < 40
    model = _mlp(seed=7)  # the resume must overwrite these weights
    result = train(model, _data(), _mse, _cfg(**RESUME_CFG), run_dir)
    assert result.resumed_from in (20, 30) and result.steps == 40 and not result.interrupted
    assert (_weights(model) - ref_weights).abs().max().item() < 1e-6
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))  # no duplicate steps from the killed run
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref_rows)) < 1e-5


def test_sigterm_saves_a_checkpoint_and_a_rerun_finishes(tmp_path, reference_run):
    ref_weights, _ = reference_run
    run_dir = tmp_path / "run_c"
    child = _start_child(tmp_path, run_dir, slow_from=0)
    _wait_for(lambda: len(read_metrics(run_dir)) >= 3, child)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 3, err[-2000:]
    stopped = int(out.split()[-1])
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["interrupted"] and not summary["finished"] and summary["steps"] == stopped < 10
    assert latest_checkpoint(run_dir).name == f"step_{stopped:06d}"
    model = _mlp(seed=7)
    result = train(model, _data(), _mse, _cfg(**RESUME_CFG), run_dir)
    assert result.resumed_from == stopped and result.steps == 40
    assert (_weights(model) - ref_weights).abs().max().item() < 1e-6


def test_sigint_in_process_raises_and_restores_handlers(tmp_path):
    calls = []

    def interrupting(model, batch):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return _mse(model, batch)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train(_mlp(), _data(), interrupting, _cfg(checkpoint_every=0, grad_accum=2), tmp_path)
    assert isinstance(info.value, KeyboardInterrupt)
    # micro-step 7 is the first half of step 4: that step completes, then the run stops
    assert info.value.result.steps == 4 and info.value.result.interrupted and len(calls) == 8
    assert latest_checkpoint(tmp_path).name == "step_000004"
    assert signal.getsignal(signal.SIGINT) is before


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    a, b, c = _mlp(), _mlp(), _mlp()
    train(a, _data(), _mse, _cfg(batch_size=8, grad_accum=1, max_steps=25), tmp_path / "a")
    train(b, _data(), _mse, _cfg(batch_size=4, grad_accum=2, max_steps=25), tmp_path / "b")
    train(c, _data(), _mse, _cfg(batch_size=4, grad_accum=1, max_steps=25), tmp_path / "c")
    assert (_weights(a) - _weights(b)).abs().max().item() < 1e-6
    assert (_weights(a) - _weights(c)).abs().max().item() > 1e-3  # the check can tell runs apart
    # the step count from epochs counts optimizer steps of batch_size * grad_accum samples
    assert total_steps_for(TrainConfig(batch_size=4, grad_accum=2, epochs=1.5), 100) == math.ceil(150 / 8)


def test_gradients_left_on_the_model_do_not_enter_the_first_step(tmp_path):
    """A model that arrives with .grad set (the benchmark's backbone step trains a system's image network in
    the same process before its own training) trains as one that arrives without."""
    clean, dirty = _mlp(), _mlp()
    x, y = _data()[:32]
    _mse(dirty, (x * 5, y))[0].backward()             # a gradient of some earlier objective
    assert all(p.grad is not None for p in dirty.parameters())
    train(clean, _data(), _mse, _cfg(max_steps=5), tmp_path / "clean")
    train(dirty, _data(), _mse, _cfg(max_steps=5), tmp_path / "dirty")
    assert torch.equal(_weights(clean), _weights(dirty))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.A_log = nn.Parameter(torch.zeros(8, 4))
        self.D = nn.Parameter(torch.ones(8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.gate = nn.Parameter(torch.ones(8, 8))
        self.gate._no_weight_decay = True
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.norm(self.proj(x) + self.frozen(x)) @ self.gate
        h = h * self.D + (self.A_log.sum(1) + self.pos_embed.mean((0, 1)))
        return self.head(h)


def test_frozen_parameters_and_weight_decay_groups(tmp_path):
    model = _Mixed()
    groups = optimizer_param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert groups[0]["names"] == ["proj.weight", "head.weight"]
    assert sorted(groups[1]["names"]) == sorted(["A_log", "D", "pos_embed", "gate", "proj.bias", "norm.weight",
                                                  "norm.bias", "head.bias"])
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in in_opt and id(model.frozen.bias) not in in_opt
    assert len(in_opt) == 10
    frozen_before = model.frozen.weight.detach().clone()
    proj_before = model.proj.weight.detach().clone()
    model.frozen.eval()  # a frozen submodule in eval mode (dropout off) stays so while training
    modes = []

    def loss_fn(m, batch):
        modes.append((m.training, m.proj.training, m.frozen.training))
        return _mse(m, batch)

    train(model, _data(), loss_fn, _cfg(max_steps=10), tmp_path)
    assert set(modes) == {(True, True, False)} and not model.frozen.training and model.proj.training
    assert torch.equal(model.frozen.weight, frozen_before)
    assert not torch.equal(model.proj.weight, proj_before)
    everything_frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        train(everything_frozen, _data(), _mse, _cfg(), tmp_path / "none")


def test_best_metric_keeps_the_best_weights(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 0.5])

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"score": next(scores), "other": 1.0}

    model = _mlp()
    result = train(model, _data(), _mse, _cfg(max_steps=20, eval_every=5, best_metric="score",
                                              checkpoint_every=5, keep_checkpoints=10),
                   tmp_path, eval_fn=eval_fn, model_config={"k": 1})
    assert result.best["step"] == 10 and result.best["value"] == 3.0 and result.last_eval["score"] == 0.5
    evals = [r for r in read_metrics(tmp_path) if "eval" in r]
    assert [(r["step"], r["eval"]["score"]) for r in evals] == [(5, 1.0), (10, 3.0), (15, 2.0), (20, 0.5)]
    best, at_10 = _mlp(seed=1), _mlp(seed=2)
    load_weights(best, tmp_path / "best")
    load_weights(at_10, tmp_path / "checkpoints" / "step_000010")
    assert torch.equal(_weights(best), _weights(at_10)) and not torch.equal(_weights(best), _weights(model))
    assert json.loads((tmp_path / "best" / "config.json").read_text()) == {"k": 1}


def test_no_periodic_evaluation_just_before_the_final_one(tmp_path):
    """3 epochs of 64.9 batches (stage 3 on the default phantom) evaluated every 64 steps: at 64, 128 and
    the end, not at 192 and again 3 steps later."""
    train(_mlp(), _data(), _mse, _cfg(max_steps=22, eval_every=10), tmp_path, eval_fn=lambda m: {"score": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path) if "eval" in r] == [10, 22]


class _Studies(Dataset):
    """Dict samples with a string, as cxpmrg_lib.data.dataset.StudyDataset yields."""

    def __init__(self):
        self.inner = _data(64)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return {"image": x, "labels": y, "study_id": f"s{i}"}


def _collate(items):
    return {"image": torch.stack([b["image"] for b in items]), "labels": torch.stack([b["labels"] for b in items]),
            "study_id": [b["study_id"] for b in items]}


def test_dict_batches_strings_pass_and_every_sample_is_seen_once_per_epoch(tmp_path):
    seen = []

    def loss_fn(model, batch):
        assert isinstance(batch["study_id"], list) and isinstance(batch["study_id"][0], str)
        seen.extend(batch["study_id"])
        return ((model(batch["image"]) - batch["labels"]) ** 2).mean()

    train(_mlp(), _Studies(), loss_fn, _cfg(batch_size=8, max_steps=None, epochs=2, log_every=1), tmp_path,
          collate_fn=_collate, batch_size_of=lambda b: 3 * len(b["study_id"]))
    assert len(seen) == 128 and sorted(seen[:64]) == sorted(seen[64:]) == sorted(f"s{i}" for i in range(64))
    assert seen[:64] != seen[64:]  # reshuffled per epoch
    assert len(read_metrics(tmp_path)) == 16


def test_bf16_autocast_on_request_and_auto_is_fp32_on_cpu(tmp_path):
    dtypes = []

    def loss_fn(model, batch):
        out = model(batch[0])
        dtypes.append(out.dtype)
        return ((out.float() - batch[1]) ** 2).mean()

    train(_mlp(), _data(), loss_fn, _cfg(max_steps=3, mixed_precision="bf16"), tmp_path / "bf16")
    train(_mlp(), _data(), loss_fn, _cfg(max_steps=3), tmp_path / "auto")
    assert dtypes == [torch.bfloat16] * 3 + [torch.float32] * 3
    summary = json.loads((tmp_path / "auto" / "train_summary.json").read_text())
    assert summary["mixed_precision"] == ("bf16" if torch.cuda.is_available() else "no")


def test_weights_round_trip_and_clear_errors(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    path = save_weights(model, tmp_path / "w", {"vocab": 10})
    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    other[1].weight = other[0].weight
    load_weights(other, path)
    assert torch.equal(other[0].weight, model[0].weight) and other[1].weight is other[0].weight
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_weights(other, tmp_path / "missing")
    with pytest.raises(RuntimeError, match="do not fit"):
        load_weights(nn.Linear(3, 3), tmp_path / "w")
    with pytest.raises(ValueError, match="no full batch"):
        train(_mlp(), _data(8), _mse, _cfg(), tmp_path / "small")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16")


def test_ranks_split_the_global_batches_of_one_process():
    for n, drop_last in ((40, True), (42, True), (42, False), (41, False)):
        one = _GlobalBatchSampler(n, 8, 0, 1, seed=3, shuffle=True, drop_last=drop_last)
        one.set_position(epoch=2, skip=1)
        ref = list(one)
        assert len(ref) == len(one) == (n // 8 if drop_last else math.ceil(n / 8)) - 1
        for world in (2, 4):
            parts = []
            for rank in range(world):
                s = _GlobalBatchSampler(n, 8, rank, world, seed=3, shuffle=True, drop_last=drop_last)
                s.set_position(epoch=2, skip=1)
                parts.append(list(s))
            for i, batch in enumerate(ref):
                joined = sum((p[i] for p in parts), [])
                assert len({len(p[i]) for p in parts}) == 1  # equal shares
                # a short last batch is padded from the start of the permutation to a multiple of world
                assert joined[:len(batch)] == batch and len(joined) == math.ceil(len(batch) / world) * world
    s = _GlobalBatchSampler(16, 16, 0, 1, seed=0, shuffle=True, drop_last=True)
    first = list(s)[0]
    assert list(_GlobalBatchSampler(16, 16, 0, 1, seed=0, shuffle=True, drop_last=True))[0] == first
    s.set_position(epoch=1, skip=0)
    assert sorted(first) == list(range(16)) and first != list(range(16)) and list(s)[0] != first


_DDP_CHILD = """
import os, sys, torch
sys.path.insert(0, {here!r})
from test_trainer import _data, _mlp, _mse, _cfg
from cxpmrg_lib.trainer import train
model = _mlp(seed=int(os.environ["RANK"]))  # rank 1 starts elsewhere: rank 0's weights must win
r = train(model, _data(), _mse, _cfg(batch_size=16, grad_accum=2, max_steps=12), sys.argv[1])
torch.save(model.state_dict(), sys.argv[1] + f"/rank{{os.environ['RANK']}}.pt")
"""


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    script = tmp_path / "ddp_child.py"
    script.write_text(_DDP_CHILD.format(here=str(HERE)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "two"
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), str(script), str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _mlp(seed=0)
    train(one, _data(), _mse, _cfg(batch_size=16, grad_accum=2, max_steps=12), tmp_path / "one")
    ranks = [torch.load(run_dir / f"rank{r}.pt") for r in (0, 1)]
    flat = [torch.cat([t.reshape(-1) for t in sd.values()]) for sd in ranks]
    assert torch.equal(flat[0], flat[1])  # identical on every rank
    assert (flat[0] - _weights(one)).abs().max().item() < 1e-5
    assert (flat[0] - _weights(_mlp(seed=0))).abs().max().item() > 1e-2  # it did train
    two_rows, one_rows = read_metrics(run_dir), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [5, 10, 12]  # written once, by the main process
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two_rows, one_rows)) < 1e-5
    assert {p.name for p in latest_checkpoint(run_dir).iterdir()} >= {"rng_state_0.pt", "rng_state_1.pt"}


def test_lr_scale_flag_gives_a_group_at_a_multiple_of_the_peak_rate(tmp_path):
    model = _Mixed()
    model.head.weight._lr_scale = 5.0
    groups = optimizer_param_groups(model, 0.05)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.05, 1.0), (0.0, 1.0), (0.05, 5.0)]
    assert groups[0]["names"] == ["proj.weight"] and groups[2]["names"] == ["head.weight"]
    opt = build_optimizer(model, TrainConfig(lr=2e-3))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(2e-3), pytest.approx(2e-3), pytest.approx(1e-2)]
