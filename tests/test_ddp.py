"""Data-parallel training under torchrun: two CPU processes (gloo) against one, resume, and refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch

from scratchlm.data import get_batch
from scratchlm.train import (
    MODEL_CONFIG,
    TRAIN_STATE,
    TrainConfig,
    Trainer,
    build_model,
    load_model,
    shakespeare_char_data,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TRAIN = ["-m", "scratchlm", "train", "--model", "gpt", "--profile", "ci", "--quiet"]


def run(args: list[str], processes: int | None = 2) -> subprocess.CompletedProcess:
    """The command line, under torchrun with `processes` processes, or plain python when None."""
    launcher = [sys.executable] if processes is None else [*TORCHRUN, f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *TRAIN, *args], capture_output=True, text=True, env=env, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


class TwoRanksInOne(Trainer):
    """One process whose batch is exactly what ranks 0 and 1 draw (generators seeded seed and seed + 1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_generators = [torch.Generator().manual_seed(self.cfg.seed + r) for r in (0, 1)]

    def next_batch(self):
        c = self.cfg
        draws = [get_batch(self.train_data, c.block_size, c.batch_size // 2 * c.grad_accum_steps, g)
                 for g in self.rank_generators]
        return tuple(torch.cat([d[i] for d in draws]) for i in (0, 1))


@pytest.fixture(scope="module")
def shakespeare():
    return shakespeare_char_data()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = ok(run(["--steps", "6", "--out", str(out)]))
    return out, result


def test_two_processes_take_the_steps_of_one_with_the_whole_batch(two_process_run, shakespeare):
    out, result = two_process_run
    _, train_data, val_data = shakespeare
    state = json.loads((out / TRAIN_STATE).read_text())
    assert state["processes"] == 2 and state["step"] == 6
    cfg = TrainConfig(**{**state["train_config"], "out_dir": None})
    assert cfg.grad_accum_steps > 1  # so no_sync is exercised
    torch.manual_seed(cfg.seed)
    model = build_model("gpt", json.loads((out / MODEL_CONFIG).read_text())["config"])
    one = TwoRanksInOne(model, cfg, train_data, val_data, verbose=False)
    one.fit(progress=False)
    losses = zip(one.history["train_loss"], state["history"]["train_loss"], strict=True)
    assert max(abs(a - b) for a, b in losses) < 1e-5
    trained = load_model(out)
    for (name, a), b in zip(one.model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert (a - b).abs().max().item() < 1e-5, name
    # process 0 alone prints: one summary line, not two
    assert result.stdout.count("val loss on the whole split") == 1


def test_a_resumed_two_process_run_continues_exactly(two_process_run, tmp_path):
    straight_dir, _ = two_process_run
    out = tmp_path / "resumed"
    ok(run(["--steps", "6", "--stop-at", "3", "--out", str(out)]))
    assert json.loads((out / TRAIN_STATE).read_text())["step"] == 3
    ok(run(["--resume", "--out", str(out)]))
    straight = json.loads((straight_dir / TRAIN_STATE).read_text())["history"]
    resumed = json.loads((out / TRAIN_STATE).read_text())["history"]
    assert resumed["train_loss"] == straight["train_loss"]
    for a, b in zip(load_model(out).state_dict().values(), load_model(straight_dir).state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resuming_with_another_number_of_processes_is_refused(two_process_run, tmp_path):
    out, _ = two_process_run
    result = run(["--resume", "--out", str(out)], processes=None)
    assert result.returncode != 0
    assert "trained by 2 process(es) and this run has 1" in result.stderr
    assert "--nproc_per_node=2" in result.stderr


def test_a_batch_that_does_not_split_across_processes_is_refused(tmp_path):
    result = run(["--steps", "2", "--out", str(tmp_path / "three")], processes=3)  # the ci batch is 8
    assert result.returncode != 0
    assert "batch_size=8 does not split across 3 processes" in result.stderr


def test_a_single_process_is_not_distributed(monkeypatch):
    from scratchlm.train import process_rank_and_count, start_data_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert start_data_parallel() is None
    assert process_rank_and_count() == (0, 1)
