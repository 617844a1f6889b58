"""Training: exact resume after SIGKILL, checkpoint safety, non-finite steps, learning on MNIST,
and the train / eval / sample commands."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CountHostSyncs
from PIL import Image

from realnvp import CheckpointError, RealNVP, RealNVPConfig, ResNet, dequantize, distributed
from realnvp.checkpoint import atomic_save
from realnvp.cli import _train_configs, build_parser
from realnvp.cli import main as cli_main
from realnvp.data import DEMO_DATA, DatasetError, load_dataset
from realnvp.evaluate import evaluate
from realnvp.figures import LABEL_HEIGHT, make_grid
from realnvp.model import inference_precision
from realnvp.train import (
    Objective,
    TrainConfig,
    Trainer,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    read_config_tables,
    resolve_checkpoint,
    run_configs,
    save_checkpoint,
    step_checkpoints,
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


def make_trainer(run_dir: Path, steps: int = 4, scales: int = 2, **overrides) -> Trainer:
    train = TrainConfig(**{**dict(run_dir=str(run_dir), steps=steps, batch_size=16,
                                  checkpoint_every=2, eval_every=1000, eval_images=32,
                                  sample_every=1000, sample_count=4, progress=False),
                           **overrides})
    return Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=scales, res_blocks=1, features=8),
                   train)


def test_sigterm_checkpoints_the_step_reached_and_the_run_resumes_there(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(train_command(run, 400, "--checkpoint-every", "1000",
                                             "--log-every", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while process.poll() is None and time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count("train_bpd") >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # what a scheduler sends before it preempts a job
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    saved = latest_checkpoint(run)
    step = load_checkpoint(saved)["run_state"]["step"]
    assert 3 <= step < 400 and f"SIGTERM: saved {saved} at step {step}" in output
    partial = checkpoint_dir(run) / f".{saved.name}.x1y2.tmp"  # as a kill mid-write leaves
    partial.write_bytes(b"half a checkpoint")
    resumed = make_trainer(run, steps=step + 1, batch_size=32)
    assert resumed.state.step == step and not partial.exists()


def signals_at(trainer, monkeypatch, step_reached, *signums):
    """Send ``signums`` to this process while the trainer takes the step after ``step_reached``
    (the handler runs between two Python bytecodes, inside the step)."""
    step = trainer.training_step

    def signalled(*args):
        if trainer.state.step == step_reached:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return step(*args)

    monkeypatch.setattr(trainer, "training_step", signalled)


def test_a_second_sigterm_exits_at_once_with_143(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=50, checkpoint_every=1000)
    signals_at(trainer, monkeypatch, 1, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        trainer.run()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert latest_checkpoint(tmp_path) is None  # no waiting for the step, so nothing saved


def test_under_torchrun_a_second_sigterm_still_lets_the_step_be_saved(tmp_path, monkeypatch):
    """A scheduler signals every process, and torchrun passes its own signal on: a worker gets
    SIGTERM twice, also when it is torchrun's only process."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchrun sets for its workers
    trainer = make_trainer(tmp_path, steps=50, checkpoint_every=1000)
    signals_at(trainer, monkeypatch, 1, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        trainer.run()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(latest_checkpoint(tmp_path))["run_state"]["step"] == 2


def test_signals_an_ignored_sigint_and_a_signal_in_the_last_step(tmp_path, monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job
    try:
        trainer = make_trainer(tmp_path / "ignored", steps=3)
        signals_at(trainer, monkeypatch, 1, signal.SIGINT)
        assert trainer.run().step == 3  # ignored stays ignored
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    trainer = make_trainer(tmp_path / "last", steps=3)
    signals_at(trainer, monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit):  # the last step's validation is cut short, as any other's
        trainer.run()
    saved = load_checkpoint(latest_checkpoint(tmp_path / "last"))["run_state"]
    assert (saved["step"], saved["pending"]) == (3, ["evaluate", "sample", "checkpoint"])
    assert make_trainer(tmp_path / "last", steps=3).run().pending == []
    trainer = make_trainer(tmp_path / "unvalidated", steps=3, valid_size=0)
    signals_at(trainer, monkeypatch, 2, signal.SIGTERM)
    assert trainer.run().step == 3  # no validation: the run had finished, nothing to interrupt
    assert latest_checkpoint(tmp_path / "unvalidated").name == "ckpt-0000003.pt"


def test_ctrl_c_in_process_checkpoints_then_interrupts(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=50, checkpoint_every=1000)
    signals_at(trainer, monkeypatch, 1, signal.SIGINT)  # handled after the step, not inside it
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert latest_checkpoint(tmp_path).name == "ckpt-0000002.pt"
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back


def test_a_stop_during_validation_saves_the_step_and_leaves_the_validation(tmp_path,
                                                                             monkeypatch, capsys):
    """A scheduler's grace period can be shorter than a validation: a SIGTERM that arrives
    during one ends it after the batch being scored, saves the step, and the resumed run
    validates that step first."""
    trainer = make_trainer(tmp_path, steps=6, eval_every=3, checkpoint_every=1000,
                           eval_images=600)  # 3 batches of validation
    read = trainer.valid_set.get_batch
    batches = []

    def signalled(*args):
        batches.append(trainer.state.step)
        if len(batches) == 1 and trainer.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return read(*args)

    monkeypatch.setattr(trainer.valid_set, "get_batch", signalled)
    with pytest.raises(SystemExit) as stopped:
        trainer.run()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert batches == [3]  # the batch being scored, no more
    assert "at step 3 (its validation left for the resumed run)" in capsys.readouterr().out
    assert [p.name for p in step_checkpoints(tmp_path)] == ["ckpt-0000003.pt"]
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    # resumed, step 3's validation is done first; a SIGTERM during its last batch (too late to
    # cut it short) stops the run before step 4, not after it
    resumed = make_trainer(tmp_path, steps=6, eval_every=3, checkpoint_every=1000,
                           eval_images=600)
    assert (resumed.state.step, resumed.state.pending) == (3, ["evaluate"])
    read, batches = resumed.valid_set.get_batch, []

    def late(*args):
        batches.append(resumed.state.step)
        if len(batches) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return read(*args)

    monkeypatch.setattr(resumed.valid_set, "get_batch", late)
    with pytest.raises(SystemExit):
        resumed.run()
    assert batches == [3, 3, 3] and "(its" not in capsys.readouterr().out
    saved = load_checkpoint(latest_checkpoint(tmp_path))["run_state"]
    assert (saved["step"], saved["pending"]) == (3, [])
    resumed = make_trainer(tmp_path, steps=6, eval_every=3, checkpoint_every=1000,
                           eval_images=600)
    resumed.run()
    valid = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
             .splitlines() if "valid_bpd" in line]
    assert [r["step"] for r in valid] == [3, 6]
    assert load_checkpoint(latest_checkpoint(tmp_path))["run_state"]["pending"] == []


def test_corrupt_checkpoint_gives_clear_error_and_previous_one_loads(tmp_path):
    make_trainer(tmp_path, steps=4).run()
    latest = latest_checkpoint(tmp_path)
    previous = tmp_path / "checkpoints" / "ckpt-0000002.pt"
    assert latest.name == "ckpt-0000004.pt" and previous.is_file()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="ckpt-0000004.pt.*truncated or corrupt"):
        load_checkpoint(latest)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*Move it out of .* to "
                                              "resume from the checkpoint before it, "
                                              "ckpt-0000002.pt"):
        make_trainer(tmp_path, steps=6)  # resuming reports the bad file and the way out
    model = RealNVP.load(previous)
    assert load_checkpoint(previous)["run_state"]["step"] == 2
    assert model.num_parameters() > 0
    latest.write_bytes(b"\x00" * 100)  # garbage
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RealNVP.load(latest)
    payload = load_checkpoint(previous)
    payload["config"]["features"] = 16  # a config that does not describe the weights
    torch.save(payload, latest)
    with pytest.raises(CheckpointError, match="ckpt-0000004.pt: its saved state does not fit "
                                              "the RealNVP its config describes.*size mismatch"):
        RealNVP.load(latest)
    with pytest.raises(CheckpointError, match="does not fit the RealNVP"):
        make_trainer(tmp_path, steps=6)
    payload["config"]["features"] = "8"
    torch.save(payload, latest)
    with pytest.raises(CheckpointError, match="model config is not valid.*features must be an "
                                              "integer"):
        RealNVP.load(latest)
    del payload["config"]
    torch.save(payload, latest)
    with pytest.raises(CheckpointError, match="no 'config' entry"):
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
    cli_main(["eval", "--checkpoint", str(run), "--dataset", "mnist-t10k", "--data-dir",
              str(DEMO_DATA), "--split", "test", "--max-images", "1", "--json", str(out)])
    one = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(name))  # strict
    assert one["images"] == 1 and one["stderr"] is None and one["bits_per_dim"] > 0
    capsys.readouterr()
    cli_main(["eval", "--checkpoint", str(run), "--max-images", "8", "--json", str(out)])
    own = json.loads(out.read_text())  # the run's own dataset, data and split by default
    assert own["dataset"] == "mnist-t10k" and own["images"] == 8
    assert str(run / "checkpoints" / "best.pt") in capsys.readouterr().out  # which file
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
    # loss and its gradients are the eager ones up to float32 rounding. One scale: compiling
    # two took 171 s on a 2-core Zen 1 (one, 69 s), as inductor compiles each layer's kernels.
    trainer = make_trainer(tmp_path, steps=2, scales=1, compile=True)
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
    # Inductor sums in another order, so a gradient that is a sum with cancellation carries
    # the rounding of its terms, not of itself (an output bias's 2.1e-5 was off by 1.3e-6 on
    # an AVX2 CPU): the absolute tolerance follows the model's largest gradient, and the whole
    # gradient vector must agree to 1e-3 relative (3e-5 there).
    scale = max(g.abs().max() for g in eager_grads)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
               for a, b in zip(compiled_grads, eager_grads))
    difference = torch.cat([(a - b).flatten() for a, b in zip(compiled_grads, eager_grads)])
    assert difference.norm() <= 1e-3 * torch.cat([b.flatten() for b in eager_grads]).norm()


def test_eval_scores_the_runs_own_validation_slice(tmp_path, monkeypatch):
    """`realnvp eval --split valid` cuts the validation slice with the run's seed and
    valid_size, whether given the run directory, a checkpoint inside it or a copy elsewhere."""
    run = tmp_path / "run"
    make_trainer(run, steps=2, seed=3, valid_size=200).run()
    train_items = set(load_dataset("mnist-t10k", DEMO_DATA, "train", seed=3,
                                   valid_size=200).source_indices.tolist())
    valid_items = load_dataset("mnist-t10k", DEMO_DATA, "valid", seed=3,
                               valid_size=200).source_indices.tolist()
    scored = []
    monkeypatch.setattr("realnvp.cli.evaluate", lambda model, dataset, **kw: scored.append(
        dataset.source_indices.tolist()) or evaluate(model, dataset, **{**kw, "max_images": 8}))
    copy = tmp_path / "elsewhere.pt"
    copy.write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    for checkpoint in (run, run / "checkpoints" / "best.pt", copy):
        for split in ("valid", "test"):  # mnist-t10k's test split is the same slice
            cli_main(["eval", "--checkpoint", str(checkpoint), "--dataset", "mnist-t10k",
                      "--data-dir", str(DEMO_DATA), "--split", split, "--precision", "fp32"])
            assert scored[-1] == valid_items, (checkpoint, split)
            assert not train_items & set(scored[-1])
    cli_main(["eval", "--checkpoint", str(run), "--dataset", "mnist-t10k", "--data-dir",
              str(DEMO_DATA), "--split", "valid", "--split-seed", "0", "--valid-size", "100"])
    assert scored[-1] == load_dataset("mnist-t10k", DEMO_DATA, "valid", seed=0,
                                      valid_size=100).source_indices.tolist()
    # MNIST's test split is the t10k file, of which this run trained on 9,000 images
    with pytest.raises(SystemExit) as refused:
        cli_main(["eval", "--checkpoint", str(run), "--dataset", "mnist", "--data-dir",
                  str(DEMO_DATA), "--split", "test"])
    assert refused.value.code == 2 and len(scored) == 7


def test_partial_config_file_overrides_only_what_it_sets(tmp_path):
    """A --config file with a few keys changes those keys only: the preset stays below it on a
    new run, and the run's own configuration below it on resume."""
    partial = tmp_path / "partial.toml"
    partial.write_text("[model]\nfeatures = 8\nres_blocks = 1\nscales = 2\n[train]\nsteps = 3\n")
    args = build_parser().parse_args(["train", "--preset", "mnist", "--config", str(partial),
                                      "--run-dir", str(tmp_path / "new")])
    model, train = _train_configs(args)
    assert model.input_shape == (1, 28, 28) and model.features == 8 and model.scales == 2
    assert train.steps == 3 and train.batch_size == TrainConfig.batch_size

    run = tmp_path / "run"
    make_trainer(run, steps=2, seed=3, valid_size=200).run()
    steps_only = tmp_path / "steps.toml"
    steps_only.write_text("[train]\nsteps = 5\n")
    args = build_parser().parse_args(["train", "--config", str(steps_only), "--run-dir",
                                      str(run)])
    model, train = _train_configs(args)
    assert train.steps == 5 and (train.seed, train.valid_size, train.batch_size) == (3, 200, 16)
    assert (model.features, model.res_blocks) == (8, 1)
    # the run's own config.toml as --config resumes; one that changes the model is refused
    args = build_parser().parse_args(["train", "--config", str(run / "config.toml")])
    assert _train_configs(args)[0] == model
    wider = tmp_path / "wider.toml"
    wider.write_text("[model]\nfeatures = 16\n")
    args = build_parser().parse_args(["train", "--config", str(wider), "--run-dir", str(run)])
    with pytest.raises(SystemExit, match=r"another architecture.*\['features'\]"):
        _train_configs(args)


@pytest.mark.parametrize("section,line,message", [
    ("train", 'lr = "0.1"', "lr must be a number, got '0.1' \\(str\\)"),
    ("train", "random_flip = 1", "random_flip must be true or false or None, got 1"),
    ("train", "lr = inf", "need finite lr > 0"),
    ("model", "scales = 2.0", "scales must be an integer, got 2.0 \\(float\\)"),
    ("model", "input_shape = [1, 28.0, 28]", "input_shape must be a list of integers"),
])
def test_config_file_values_of_the_wrong_type_are_named(tmp_path, capsys, section, line,
                                                         message):
    """A value TOML reads with another type (a string, a float for an integer) is refused with
    its key before any data is read, not left to a TypeError deep inside the run."""
    config = tmp_path / "bad.toml"
    config.write_text(f"[{section}]\n{line}\n")
    with pytest.raises(SystemExit) as refused:
        cli_main(["train", "--preset", "mnist", "--config", str(config), "--run-dir",
                  str(tmp_path / "run")])
    assert refused.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_resume_without_config_file_uses_the_checkpoints_record(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, steps=2, seed=3, valid_size=200).run()
    (run / "config.toml").unlink()
    args = build_parser().parse_args(["train", "--run-dir", str(run), "--steps", "4"])
    model, train = _train_configs(args)
    assert (model.features, model.input_shape) == (8, (1, 28, 28))
    assert (train.steps, train.seed, train.valid_size, train.batch_size) == (4, 3, 200, 16)


@pytest.mark.parametrize("bad,match", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(log_every=0), "log_every"), (dict(valid_size=-1), "valid_size"),
    (dict(lr=0.0), "lr > 0"), (dict(memory_mode="all"), "memory_mode must be one of"),
    (dict(steps=2.5), "steps must be an integer")])
def test_bad_training_options_are_refused_before_any_work(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "x", "--dataset", "mnist", "--batch-size", "0"],
    ["eval", "--checkpoint", "x", "--dataset", "mnist", "--max-images", "-2"],
    ["sample", "--checkpoint", "x", "-n", "0", "--out", "x.png"]])
def test_counts_on_the_command_line_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_sample_to_a_folder_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    make_trainer(run, steps=2).run()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sample", "--checkpoint", str(run), "-n", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}*.tmp"))  # no temporary file left


def test_a_run_folder_loads_from_anywhere_in_eval_mode(tmp_path, monkeypatch):
    """RealNVP.load and --checkpoint take the run folder (or its checkpoints/ folder); a
    relative --data-dir is kept absolute, so that eval works from another folder."""
    import realnvp.data

    data = tmp_path / "data"
    shutil.copytree(DEMO_DATA, data)
    monkeypatch.chdir(tmp_path)
    make_trainer(Path("run"), steps=2, dataset="mnist-t10k", data_dir="data").run()
    assert read_config_tables(tmp_path / "run" / "config.toml")[1]["data_dir"] == str(data)
    model = RealNVP.load("run")
    assert not model.training
    assert model.config == RealNVP.load("run/checkpoints").config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(realnvp.data, "DEMO_DATA", Path("/nonexistent"))  # not the fallback
    cli_main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--max-images",
              "8", "--precision", "fp32"])


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys,
                                                                          monkeypatch):
    run = tmp_path / "run"
    make_trainer(run, steps=2).run()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    monkeypatch.setattr("realnvp.cli.evaluate", lambda *a, **k: pytest.fail("evaluated"))
    for command, message in [
            (["eval", "--checkpoint", str(run), "--json", str(tmp_path)], "is a folder"),
            (["eval", "--checkpoint", str(run), "--json", str(a_file / "r.json")],
             "a_file is a file, not a folder"),
            (["sample", "--checkpoint", str(run), "--out", str(a_file / "s.png")],
             "a_file is a file, not a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(command)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, command
    with pytest.raises(ValueError, match="a_file is a file; give a folder"):
        make_trainer(a_file)


def test_a_bad_image_mid_run_stops_with_a_checkpoint_of_the_step_reached(tmp_path, monkeypatch):
    """A truncated image found when its batch is read (lazily decoded formats): the trainer
    saves the step it reached, and rerunning after the file is replaced resumes there."""
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        path = data / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    run = tmp_path / "run"
    config = TrainConfig(dataset="folder", data_dir=str(data), run_dir=str(run), steps=6,
                         batch_size=8, valid_size=4, checkpoint_every=100, eval_every=100,
                         sample_every=100, progress=False)
    model = RealNVPConfig(input_shape=(1, 8, 8), scales=2, res_blocks=1, features=4)
    trainer = Trainer(model, config)
    good = trainer.train_set.get_batch
    calls = []

    def failing_on_the_fourth_batch(index):
        calls.append(1)
        if len(calls) == 4:
            raise DatasetError(f"{data / '07.png'}: cannot decode image (truncated)")
        return good(index)

    monkeypatch.setattr(trainer.train_set, "get_batch", failing_on_the_fourth_batch)
    with pytest.raises(DatasetError, match="07.png"):
        trainer.run()
    saved = latest_checkpoint(run)
    assert saved is not None and saved.name == "ckpt-0000003.pt"
    state = load_checkpoint(saved)["run_state"]
    assert (state["step"], state["epoch"], state["epoch_offset"]) == (3, 0, 24)
    resumed = Trainer(model, config)
    assert resumed.state.step == 3 and resumed.run().step == 6


@pytest.mark.parametrize("failure", ["bad validation image", "non-finite validation"])
def test_a_validation_that_stops_the_run_keeps_its_steps(tmp_path, monkeypatch, failure):
    """A bad image: the model is fine, its step is saved. A non-finite score: nothing is saved
    over the last good checkpoint (finite weights can still hold absurd statistics)."""
    trainer = make_trainer(tmp_path, steps=6, checkpoint_every=2, eval_every=3,
                           keep_checkpoints=1)

    def failing(*args, **kwargs):
        if failure == "bad validation image":
            raise DatasetError("x/07.png: cannot decode image (truncated)")
        raise FloatingPointError("log_prob produced a non-finite value")

    if failure == "bad validation image":
        monkeypatch.setattr(trainer.valid_set, "get_batch", failing)
        expected = (DatasetError, "07.png")
    else:
        monkeypatch.setattr("realnvp.train.evaluate", failing)
        expected = (FloatingPointError, "validation at step 3: log_prob.*not saved. The last "
                                        "good checkpoint is .*ckpt-0000002.pt")
    with pytest.raises(expected[0], match=expected[1]):
        trainer.run()
    step = 3 if failure == "bad validation image" else 2
    assert [p.name for p in step_checkpoints(tmp_path)] == [f"ckpt-{step:07d}.pt"]
    resumed = make_trainer(tmp_path, steps=6, checkpoint_every=2, eval_every=3,
                           keep_checkpoints=1)
    assert resumed.state.step == step
    if failure == "bad validation image":  # the image replaced: step 3's validation is redone
        assert resumed.state.pending == ["evaluate"]
        assert not (tmp_path / "checkpoints" / "best.pt").exists()
        resumed.run()
        valid = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
                 .splitlines() if "valid_bpd" in line]
        assert [r["step"] for r in valid] == [3, 6]
        best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["run_state"]
        assert best["step"] in (3, 6) and best["pending"] == []
        assert load_checkpoint(latest_checkpoint(tmp_path))["run_state"]["pending"] == []


def test_conditional_sample_grids_cycle_the_labels_of_a_small_validation_set(tmp_path):
    trainer = make_trainer(tmp_path, steps=1, conditional=True, valid_size=3, sample_count=7,
                           eval_images=3)
    assert len(trainer.valid_set) == 3
    labels = trainer.valid_set.get_batch(torch.arange(3))[1]
    path = trainer.write_samples()
    with Image.open(path) as grid:
        drawn = trainer.model.sample(7, cond=labels[torch.arange(7) % 3],
                                     generator=torch.Generator().manual_seed(0))
        assert grid.size == tuple(reversed(make_grid(drawn).shape[1:]))


def test_num_classes_must_agree_with_conditional_and_the_dataset(tmp_path):
    model = dict(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=4)
    run = dict(run_dir=str(tmp_path), steps=1, progress=False)
    with pytest.raises(ValueError, match="num_classes=5, but the dataset has 10 class labels"):
        Trainer(RealNVPConfig(**model, num_classes=5), TrainConfig(**run, conditional=True))
    with pytest.raises(ValueError, match="the run is not: train with conditional=True"):
        Trainer(RealNVPConfig(**model, num_classes=10), TrainConfig(**run))
    trainer = Trainer(RealNVPConfig(**model, num_classes=10), TrainConfig(**run, conditional=True))
    assert trainer.model.config.num_classes == 10


def test_demo_says_when_it_resumes(tmp_path, capsys):
    argv = ["demo", "--steps", "2", "--run-dir", str(tmp_path), "--no-progress"]
    cli_main(argv)
    assert "resuming" not in capsys.readouterr().out
    cli_main(argv)
    assert f"resuming from {tmp_path / 'checkpoints' / 'ckpt-0000002.pt'}" in \
        capsys.readouterr().out


def test_resume_refuses_a_changed_split_seed_conditioning_or_fewer_steps(tmp_path):
    make_trainer(tmp_path, steps=2).run()
    config = (tmp_path / "config.toml").read_text()
    for change, match in [(dict(seed=1), "seed 0 → 1"),
                          (dict(valid_size=50), "valid_size None → 50"),
                          (dict(conditional=True), "conditional False → True"),
                          (dict(steps=1), "at step 2 already, past steps=1")]:
        with pytest.raises(ValueError, match=match):
            make_trainer(tmp_path, **{"steps": 4, **change})
    assert (tmp_path / "config.toml").read_text() == config  # nothing rewritten
    assert make_trainer(tmp_path, steps=4, lr=5e-4).state.step == 2  # other options may change


def test_a_best_model_of_another_run_is_refused_or_ignored(tmp_path):
    other = tmp_path / "other"
    make_trainer(other, steps=2).run()
    best = load_checkpoint(checkpoint_dir(other) / "best.pt")
    best["run_state"]["best_valid_bpd"] = 0.5  # better than anything this run will reach
    torch.save(best, checkpoint_dir(other) / "best.pt")
    fresh = tmp_path / "fresh"
    checkpoint_dir(fresh).mkdir(parents=True)
    shutil.copy(checkpoint_dir(other) / "best.pt", checkpoint_dir(fresh) / "best.pt")
    make_trainer(fresh, steps=2)  # the same architecture, split and seed: the same steps
    with pytest.raises(ValueError, match="best model of another run"):
        make_trainer(fresh, steps=2, seed=1)
    run = tmp_path / "run"
    make_trainer(run, steps=2, seed=1).run()
    own = load_checkpoint(latest_checkpoint(run))["run_state"]["best_valid_bpd"]
    shutil.copy(checkpoint_dir(other) / "best.pt", checkpoint_dir(run) / "best.pt")
    resumed = make_trainer(run, steps=4, seed=1)
    assert resumed.state.best_valid_bpd == own > 0.5


def test_checkpoints_are_ordered_by_step_and_a_best_only_run_resolves(tmp_path):
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    for name in ("ckpt-9999000.pt", "ckpt-10000000.pt", "ckpt-9999500.pt", "ckpt-backup.pt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in step_checkpoints(tmp_path)] == [
        "ckpt-9999000.pt", "ckpt-9999500.pt", "ckpt-10000000.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt-10000000.pt"
    run = tmp_path / "run"
    make_trainer(run, steps=2).run()
    only_best = tmp_path / "only-best"
    checkpoint_dir(only_best).mkdir(parents=True)
    shutil.copy(checkpoint_dir(run) / "best.pt", checkpoint_dir(only_best) / "best.pt")
    assert resolve_checkpoint(only_best, prefer="latest").name == "best.pt"
    assert run_configs(only_best)[1].seed == 0


def test_bad_device_seed_batch_and_missing_tensorboard_fail_before_any_file(tmp_path,
                                                                            monkeypatch):
    from realnvp.distributed import pick_device

    with pytest.raises(ValueError, match="unknown device 'foo'"):
        pick_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    for seed in (-1, 2**40, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer"):
            TrainConfig(seed=seed)
    with pytest.raises(ValueError, match="fewer than one batch of 20000"):
        make_trainer(tmp_path / "big", batch_size=20000)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ValueError, match="tensorboard package"):
        make_trainer(tmp_path / "tb", tensorboard=True)
    with pytest.raises(ValueError, match="random_flip is for images; 'moons' holds vectors"):
        Trainer(RealNVPConfig(input_shape=(2,)), TrainConfig(
            dataset="moons", run_dir=str(tmp_path / "toy"), random_flip=True, progress=False))
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").iterdir())
    assert not (tmp_path / "tb").exists()


def test_restart_drops_redone_and_cut_short_metrics(tmp_path):
    """metrics.jsonl after a kill: the records after the last checkpoint (all of them when
    there is none) and a half-written last line are dropped when the run restarts."""
    records = "".join(json.dumps({"step": s, "train_bpd": 5.0}) + "\n" for s in range(1, 5))
    (tmp_path / "metrics.jsonl").write_text(records + '{"step": 5, "train_b')
    make_trainer(tmp_path, steps=2)  # no checkpoint yet: starts at step 0
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    make_trainer(tmp_path, steps=2).run()  # checkpoints at step 2
    logged = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(logged + records.replace('"step": 4', '"step": 9')
                                            + '{"step": 10, "tr')
    make_trainer(tmp_path, steps=4)
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [s for s in steps if s <= 2] and 2 in steps
    assert steps == [json.loads(line)["step"] for line in logged.splitlines()] + [1, 2]


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    make_trainer(tmp_path, steps=2).run()
    with pytest.raises(ValueError, match="checkpoints of an earlier run.*ckpt-0000002.pt"):
        Trainer(RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=8),
                TrainConfig(run_dir=str(tmp_path), steps=2, progress=False), resume=False)


@pytest.mark.parametrize("flip", [None, True, False])
def test_random_flip_option_overrides_the_datasets_default(tmp_path, shared_data, flip):
    """npz has no flips of its own; --random-flip turns them on (the paper flips CIFAR-10)."""
    npz = shared_data / "cifar10" / "cifar10_lossless_subset.npz"
    trainer = Trainer(RealNVPConfig(input_shape=(3, 32, 32), scales=2, res_blocks=1, features=4),
                      TrainConfig(dataset="npz", data_dir=str(npz), run_dir=str(tmp_path),
                                  random_flip=flip, progress=False))
    assert trainer.train_set.random_flip is bool(flip)
    images, _ = trainer.train_set.get_batch(torch.arange(64))
    out = trainer.train_set.train_transform(images, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, i.flip(-1)) and not torch.equal(o, i))
               for o, i in zip(out, images)]
    assert (20 < sum(flipped) < 44) if flip else not any(flipped)


def test_four_channel_images_train_and_their_sample_grids_are_rgba(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "rgba.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (40, 8, 8, 4), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 8, 8, 4), dtype=np.uint8))
    run = tmp_path / "run"
    Trainer(RealNVPConfig(input_shape=(4, 8, 8), scales=1, res_blocks=1, features=4),
            TrainConfig(dataset="npz", data_dir=str(npz), run_dir=str(run), steps=2,
                        batch_size=8, sample_every=1, sample_count=4, eval_every=1000,
                        progress=False)).run()
    with Image.open(run / "samples" / "step-0000002.png") as grid:
        assert grid.mode == "RGBA" and np.asarray(grid).shape[-1] == 4
    # a titled figure of RGBA samples: the titles are dark and opaque, not transparent
    out = tmp_path / "temperatures.png"
    cli_main(["sample", "--checkpoint", str(run), "-n", "2", "--temperature", "0", "1",
              "--out", str(out)])
    with Image.open(out) as figure:
        pixels = np.asarray(figure)
    assert figure.mode == "RGBA" and pixels.shape[-1] == 4
    title = pixels[:LABEL_HEIGHT]
    assert (title[..., 3] == 255).all() and title[..., :3].min() < 64


def test_resume_on_another_kind_of_device_reseeds_its_streams(tmp_path, capsys):
    """A CUDA generator's state (16 bytes) cannot be loaded into a CPU generator: a run
    moved between the two continues with a fresh stream seeded by (seed, step)."""
    make_trainer(tmp_path, steps=2).run()
    path = latest_checkpoint(tmp_path)
    payload = load_checkpoint(path)
    payload["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator's
    torch.save(payload, path)
    resumed = make_trainer(tmp_path, steps=4)
    assert "'noise' random stream was saved on another kind of device" in capsys.readouterr().err
    expected = torch.Generator().manual_seed(distributed.stream_seed(0, 0, 2, "noise"))
    assert torch.equal(resumed.generators["noise"].get_state(), expected.get_state())
    assert torch.equal(resumed.generators["augment"].get_state(), payload["rng"]["augment"])
    assert resumed.run().step == 4


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_open_permissions(tmp_path):
    from realnvp.checkpoint import atomic_write, atomic_write_text

    path = tmp_path / "file.txt"
    atomic_write_text(path, "old")

    def fails_halfway(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails_halfway)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["file.txt"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    assert path.stat().st_mode == plain.stat().st_mode


def test_resume_keeps_a_best_model_newer_than_its_checkpoint(tmp_path):
    """best.pt saved after the checkpoint a run resumes from (eval_every < checkpoint_every):
    its score is the one to beat, so no worse model replaces it."""
    make_trainer(tmp_path, steps=4, eval_every=1, eval_images=16).run()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["run_state"]
    (tmp_path / "checkpoints" / "ckpt-0000004.pt").unlink()  # as if killed after step 3's eval
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))["run_state"]
    assert ckpt["step"] == 2 and best["step"] > 2
    assert best["best_valid_bpd"] < ckpt["best_valid_bpd"]  # the model improved after step 2
    resumed = make_trainer(tmp_path, steps=4, eval_every=1, eval_images=16)
    assert resumed.state.best_valid_bpd == best["best_valid_bpd"]


def npz_run(tmp_path, npz, steps=2, **overrides) -> Trainer:
    return Trainer(RealNVPConfig(input_shape=(3, 8, 8), scales=1, res_blocks=1, features=4),
                   TrainConfig(**{**dict(dataset="npz", data_dir=str(npz),
                                         run_dir=str(tmp_path / "run"), steps=steps,
                                         batch_size=8, checkpoint_every=1, eval_every=1000,
                                         eval_images=8, sample_every=1000, progress=False),
                                  **overrides}))


def test_validation_split_unlike_the_training_split_is_refused_before_training(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "shape.npz", x_train=x, x_valid=x[:8, :, :, :1], x_test=x[:8])
    with pytest.raises(DatasetError, match=r"validation images of shape \(1, 8, 8\), training "
                                           r"images of shape \(3, 8, 8\)"):
        npz_run(tmp_path, tmp_path / "shape.npz")
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "nolabels.npz", x_train=x, y_train=y, x_valid=x[:8], x_test=x[:8])
    npz_run(tmp_path, tmp_path / "nolabels.npz", steps=1).run()  # unconditional: labels unused
    with pytest.raises(DatasetError, match="training split has class labels, the validation "
                                           "split no labels"):
        npz_run(tmp_path / "c", tmp_path / "nolabels.npz", conditional=True)
    assert not (tmp_path / "c" / "run" / "checkpoints").exists()


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    """Images added to (or removed from) the dataset move its validation slice and its epoch
    order: a resume would score the run partly on images it trained on."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=x[:40], x_test=x[:8])  # validation: a seeded slice of x_train
    npz_run(tmp_path, npz).run()
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert saved["data"]["train_images"] == 36 and saved["data"]["valid_images"] == 4
    np.savez(npz, x_train=x[:40], x_test=x[:4])  # the test split is not the run's concern
    assert npz_run(tmp_path, npz, steps=3).state.step == 2
    np.savez(npz, x_train=x, x_test=x[:8])
    with pytest.raises(ValueError, match=r"has changed since the checkpoint \(train images 36 → "
                                         r"45, valid images 4 → 5, valid positions"):
        npz_run(tmp_path, npz, steps=3)
    # as many images, one pixel of each changed: other data, the same count and split
    changed = x[:40].copy()
    changed[:, 0, 0, 0] ^= 1
    np.savez(npz, x_train=changed, x_test=x[:8])
    with pytest.raises(ValueError, match=r"has changed since the checkpoint \(train content "
                                         r"[0-9a-f]{8} → [0-9a-f]{8}, valid content "):
        npz_run(tmp_path, npz, steps=3)
    # a checkpoint written before the contents' CRCs were saved is checked on the rest only
    path = latest_checkpoint(tmp_path / "run")
    payload = load_checkpoint(path)
    assert set(payload["data"]) == {"train_images", "valid_images", "valid_positions",
                                    "train_content", "valid_content"}
    del payload["data"]["train_content"], payload["data"]["valid_content"]
    atomic_save(payload, path)
    assert npz_run(tmp_path, npz, steps=3).state.step == 2


def test_resume_checks_the_labels_of_a_conditional_run_only(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, 40)
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    npz_run(tmp_path / "u", npz).run()
    npz_run(tmp_path / "c", npz, conditional=True).run()
    np.savez(npz, x_train=x, y_train=(y + 1) % 3, x_test=x[:8], y_test=y[:8])
    assert npz_run(tmp_path / "u", npz, steps=3).state.step == 2  # labels it does not use
    with pytest.raises(ValueError, match=r"has changed since the checkpoint \(train labels "
                                         r"[0-9a-f]{8} → [0-9a-f]{8}, valid labels"):
        npz_run(tmp_path / "c", npz, steps=3, conditional=True)


def test_the_papers_training_recipe(tmp_path, monkeypatch):
    """SPEC §3: Adam (lr 1e-3, betas 0.9/0.999), batch 64, L2 5e-5 on the weight-norm
    magnitudes and tanh scales, global gradient-norm clipping at 100."""
    t = TrainConfig()
    assert (t.lr, t.beta1, t.beta2, t.batch_size, t.l2, t.grad_clip) == \
        (1e-3, 0.9, 0.999, 64, 5e-5, 100.0)
    model = RealNVP(RealNVPConfig(input_shape=(1, 8, 8), scales=1, res_blocks=1, features=4))
    penalised = {id(p) for p in model.l2_parameters()}
    for name, p in model.named_parameters():  # exactly the magnitudes g and the tanh scales
        assert (id(p) in penalised) == name.endswith(("weight_g", ".scale")), name
    with torch.no_grad():
        for p in model.l2_parameters():
            p.normal_()
    x = dequantize(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    loss, bpd = Objective(model, 5e-5)(x, None)
    by_hand = 5e-5 * sum(float(p.pow(2).sum()) for p in model.l2_parameters())
    assert math.isclose(float(loss - bpd), by_hand, rel_tol=1e-4)

    # the trainer's step clips the global gradient norm to grad_clip
    trainer = make_trainer(tmp_path, steps=1, grad_clip=1e-3)
    clip, seen = torch.nn.utils.clip_grad_norm_, []

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        before = clip(params, max_norm, *args, **kwargs)
        after = torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None))
        seen.append((float(before), max_norm, float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    trainer.training_step(*trainer.next_batch(), 1e-3)
    (before, max_norm, after), = seen
    assert max_norm == 1e-3 and before > 1e-3 and math.isclose(after, 1e-3, rel_tol=1e-3)


def test_valid_size_0_trains_on_every_image_without_validation(tmp_path, capsys):
    """The paper's CIFAR-10 models trained on all 50,000 training images: valid_size 0 keeps no
    validation slice, runs no validation and writes no best.pt; checkpoints, sample grids
    (labels from the training images) and resuming work as usual."""
    run = tmp_path / "run"
    cli_main(["train", "--preset", "mnist", *TINY, "--dataset", "mnist-t10k", "--valid-size",
              "0", "--conditional", "--run-dir", str(run), "--steps", "2", "--batch-size", "16",
              "--eval-every", "1", "--sample-every", "2", "--sample-count", "4",
              "--checkpoint-every", "1", "--no-progress"])
    assert "no validation (valid_size 0)" in capsys.readouterr().out
    trainer = make_trainer(run, steps=3, valid_size=0, conditional=True)
    assert len(trainer.train_set) == 10_000 and trainer.valid_set is None
    assert trainer.state.step == 2 and not (run / "checkpoints" / "best.pt").exists()
    assert (run / "samples" / "step-0000002.png").is_file()
    assert not any("valid_bpd" in line for line in (run / "metrics.jsonl").read_text()
                   .splitlines())
    assert trainer.run().step == 3
    with pytest.raises(ValueError, match="valid_size 0 → 100"):
        make_trainer(run, steps=4, valid_size=100, conditional=True)
