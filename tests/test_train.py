"""Training: exact resume after SIGKILL, checkpoint safety, non-finite steps, learning on MNIST,
and the train / eval / sample commands."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CountHostSyncs
from PIL import Image

from realnvp import CheckpointError, RealNVP, RealNVPConfig, ResNet, dequantize
from realnvp.cli import main as cli_main
from realnvp.data import load_dataset
from realnvp.evaluate import evaluate
from realnvp.model import inference_precision
from realnvp.train import (
    DEMO_DATA,
    Objective,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

TINY = ["--scales", "2", "--res-blocks", "1", "--features", "8"]


def train_command(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "realnvp", "train", "--preset", "mnist", "--dataset",
            "mnist-t10k", "--data-dir", str(DEMO_DATA), "--run-dir", str(run_dir), "--steps",
            str(steps), "--batch-size", "32", "--checkpoint-every", "20", "--eval-every", "20",
            "--eval-images", "64", "--sample-every", "1000", "--sample-count", "4",
            "--no-progress", *TINY, *extra]


def test_exact_resume_after_sigkill(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_command(straight, 40), check=True, capture_output=True)
    # The second run is killed (SIGKILL: no cleanup at all) once its step-20 checkpoint exists.
    process = subprocess.Popen(train_command(killed, 40), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "ckpt-0000020.pt"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "ckpt-0000040.pt").exists()  # really cut short
    resumed = subprocess.run(train_command(killed, 40), check=True, capture_output=True,
                             text=True)
    assert "resuming from" in resumed.stdout and "step 20" in resumed.stdout

    a = load_checkpoint(straight / "checkpoints" / "ckpt-0000040.pt")
    b = load_checkpoint(killed / "checkpoints" / "ckpt-0000040.pt")
    assert a["run_state"]["step"] == b["run_state"]["step"] == 40
    for name, tensor in a["state_dict"].items():  # parameters and batch-norm statistics
        assert torch.equal(tensor, b["state_dict"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[field], b["optimizer"]["state"][key][field])
    assert any("running_var" in n and not torch.all(t == 1) for n, t in a["state_dict"].items())
    # the metrics of the steps redone after the kill are not duplicated
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text()
             .splitlines() if "train_bpd" in line]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def make_trainer(run_dir: Path, steps: int = 4, **overrides) -> Trainer:
    train = TrainConfig(run_dir=str(run_dir), steps=steps, batch_size=16, checkpoint_every=2,
                        eval_every=1000, eval_images=32, sample_every=1000, sample_count=4,
                        progress=False, **overrides)
    return Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=8),
                   train)


def test_corrupt_checkpoint_gives_clear_error_and_previous_one_loads(tmp_path):
    make_trainer(tmp_path, steps=4).run()
    latest = latest_checkpoint(tmp_path)
    previous = tmp_path / "checkpoints" / "ckpt-0000002.pt"
    assert latest.name == "ckpt-0000004.pt" and previous.is_file()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="ckpt-0000004.pt.*truncated or corrupt"):
        load_checkpoint(latest)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        make_trainer(tmp_path, steps=6)  # resuming reports the bad file too
    model = RealNVP.load(previous)
    assert load_checkpoint(previous)["run_state"]["step"] == 2
    assert model.num_parameters() > 0
    latest.write_bytes(b"\x00" * 100)  # garbage
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RealNVP.load(latest)


def test_nonfinite_state_never_overwrites_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    trainer.run()
    path = latest_checkpoint(tmp_path)
    before = path.read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        save_checkpoint(path, trainer.model, trainer.optimizer, trainer.state,
                        trainer.train_config, trainer.generators)
    assert path.read_bytes() == before


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=10, max_nonfinite=3)
    params = [p.detach().clone() for p in trainer.model.parameters()]
    stats = {n: b.clone() for n, b in trainer.model.named_buffers()}
    import realnvp.train as train_module

    monkeypatch.setattr(train_module, "dequantize",
                        lambda x, generator=None: torch.full(x.shape, float("nan")))
    with pytest.raises(FloatingPointError, match="4 training steps had a non-finite loss"):
        trainer.run()
    assert trainer.state.nonfinite_steps == 4
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), params))
    assert all(torch.equal(b, stats[n]) for n, b in trainer.model.named_buffers())
    # counted on the device, read at the loop's syncs (here the checkpoints, every 2 steps)
    log = (tmp_path / "metrics.jsonl").read_text()
    assert '"skipped_nonfinite": 2' in log and '"skipped_nonfinite": 4' in log


def test_training_step_never_waits_for_the_device(tmp_path):
    """No host sync in a step, taken or skipped, and a skipped step leaves the parameters, Adam's
    moments and step counts and the batch-norm buffers exactly as they were."""
    trainer = make_trainer(tmp_path)
    images, labels = trainer.next_batch()
    trainer.training_step(images, labels, 1e-3)  # Adam's state exists from here on

    def state():
        return ([p.detach().clone() for p in trainer.model.parameters()]
                + [b.clone() for b in trainer.model.buffers()]
                + [v.clone() for s in trainer.optimizer.state.values() for v in s.values()])

    before = state()
    poisoned = next(trainer.model.parameters())
    with torch.no_grad():
        saved = poisoned.clone()
        poisoned.view(-1)[0] = float("nan")  # a NaN loss and NaN gradients
        before[0] = poisoned.detach().clone()
    with CountHostSyncs() as counter:
        _, skipped = trainer.training_step(images, labels, 1e-3)
    assert counter.syncs == 0 and bool(skipped)
    after = state()
    # equal, the one NaN included (torch.equal counts NaN as different from itself)
    assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(after, before))
    with torch.no_grad():
        poisoned.copy_(saved)
    before = state()
    with CountHostSyncs() as counter:
        _, skipped = trainer.training_step(images, labels, 1e-3)
    assert counter.syncs == 0 and not bool(skipped)
    after = state()
    changed = [not torch.equal(a, b) for a, b in zip(after, before)]
    n_params = len(list(trainer.model.parameters()))
    assert all(changed[:n_params])  # every parameter moved (Adam: lr-sized steps)
    assert any(changed[n_params:])  # running averages and Adam's state too


def test_training_on_real_mnist_learns(tmp_path, shared_data):
    train = TrainConfig(dataset="mnist", data_dir=str(shared_data / "mnist"), run_dir=str(tmp_path),
                        steps=120, batch_size=32, lr=2e-3, warmup_steps=10, eval_every=1000,
                        eval_images=500, sample_every=1000, sample_count=4,
                        checkpoint_every=1000, progress=False)
    trainer = Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=16),
                      train)
    test = load_dataset("mnist", shared_data / "mnist", "test")
    before = evaluate(trainer.model, test, max_images=500).mean
    trainer.run()
    after = evaluate(trainer.model, test, max_images=500).mean
    print(f"held-out bits/dim: {before:.3f} at initialisation, {after:.3f} after 120 steps")
    assert after <= before - 2.0, (before, after)


def test_eval_and_sample_commands(tmp_path, capsys):
    run = tmp_path / "run"
    make_trainer(run, steps=2).run()
    out = tmp_path / "eval.json"
    cli_main(["eval", "--checkpoint", str(run), "--dataset", "mnist-t10k", "--data-dir",
              str(DEMO_DATA), "--split", "test", "--max-images", "64", "--samples", "2",
              "--json", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["images"] == 64 and record["dequantization_samples"] == 2
    assert 0 < record["bits_per_dim"] < 16 and record["stderr"] > 0
    assert f"{record['bits_per_dim']:.4f}" in printed
    # evaluation defaults to bf16 s/t networks where the CPU has bf16 (this project's does)
    assert record["precision"] == inference_precision("cpu")
    cli_main(["eval", "--checkpoint", str(run), "--dataset", "mnist-t10k", "--data-dir",
              str(DEMO_DATA), "--split", "test", "--max-images", "64", "--samples", "2",
              "--precision", "fp32", "--json", str(out)])
    fp32 = json.loads(out.read_text())
    assert fp32["precision"] == "fp32"
    assert abs(fp32["bits_per_dim"] - record["bits_per_dim"]) <= 0.01
    assert (fp32["bits_per_dim"] != record["bits_per_dim"]) == (record["precision"] == "bf16")
    png = tmp_path / "samples.png"
    cli_main(["sample", "--checkpoint", str(run / "checkpoints" / "ckpt-0000002.pt"), "-n", "6",
              "--temperature", "0.7", "--nrow", "3", "--out", str(png)])
    with Image.open(png) as image:
        assert image.size == (3 * 30 + 2, 2 * 30 + 2) and image.mode == "L"


@pytest.mark.parametrize("command", ["train", "eval", "sample", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: realnvp " + command in capsys.readouterr().out


def test_resume_refuses_another_architecture(tmp_path):
    make_trainer(tmp_path, steps=2).run()
    with pytest.raises(SystemExit, match="another architecture"):
        cli_main(["train", "--run-dir", str(tmp_path), "--steps", "4", "--features", "16"])


@pytest.mark.parametrize("precision,memory_mode,recompute,expected", [
    ("bf16", "invertible", None, True), ("fp32", "checkpoint", False, False),
    ("fp32", "none", True, True)])
def test_training_options_reach_the_model(tmp_path, precision, memory_mode, recompute, expected):
    trainer = make_trainer(tmp_path, steps=2, precision=precision, memory_mode=memory_mode,
                           recompute_activations=recompute)
    assert trainer.model.precision == precision and trainer.model.memory_mode == memory_mode
    nets = [m for m in trainer.model.modules() if isinstance(m, ResNet)]
    assert nets and all(net.recompute == expected for net in nets)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    state = trainer.run()
    assert state.step == 2 and state.nonfinite_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ValueError, match="precision"):
        make_trainer(tmp_path / "bad", precision="fp16")


def test_compiled_training_matches_eager(tmp_path):
    # --compile wraps the loss in torch.compile (inductor): the run trains, and the compiled
    # loss and its gradients are the eager ones up to float32 rounding.
    trainer = make_trainer(tmp_path, steps=2, compile=True)
    trainer.run()
    assert type(trainer.objective).__name__ == "OptimizedModule"
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_bpd" in r] and all(
        math.isfinite(r["train_bpd"]) for r in log if "train_bpd" in r)
    model = trainer.model.train()
    x = dequantize(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8),
                   generator=torch.Generator().manual_seed(3))
    results = []
    for objective in (Objective(model, 5e-5), trainer.objective):
        model.zero_grad()
        loss, _ = objective(x, None)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert abs(eager_loss - compiled_loss) < 1e-5
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6)
               for a, b in zip(compiled_grads, eager_grads))
