"""Training on several processes (torch.distributed, gloo on CPU): 2 ranks × batch B with
synchronised batch norm compute what 1 rank × batch 2B computes; checkpoints resume across world
sizes (2 → 1 → 2); only rank 0 writes; the data position and the global batch."""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import realnvp.model
import realnvp.train
from realnvp import RealNVPConfig
from realnvp.data import DEMO_DATA, DatasetError
from realnvp.distributed import agreed_signal, max_each_over_processes, setup, shutdown
from realnvp.train import (
    RunState,
    TrainConfig,
    Trainer,
    batch_indices,
    latest_checkpoint,
    load_checkpoint,
)

MODEL = RealNVPConfig(input_shape=(1, 28, 28), scales=2, res_blocks=1, features=8)
TINY = ["--scales", "2", "--res-blocks", "1", "--features", "8"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread_env(monkeypatch):
    """Every process on one thread (2 cores here) and gloo on the loopback interface only."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def spawn(worker, world: int, *args) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` processes joined by torchrun's variables
    (the Trainer creates the process group from them, as under torchrun)."""
    torch.multiprocessing.spawn(_entry, args=(world, free_port(), worker, args), nprocs=world)


def _entry(rank: int, world: int, port: int, worker, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    faulthandler.enable()  # a crash in C++ (gloo) prints where each thread was
    torch.set_num_threads(1)
    try:
        worker(rank, world, *args)
    finally:
        shutdown()


def watch_writes(root: Path) -> list[str]:
    """Record every file or folder this process creates, opens for writing, renames or deletes
    under ``root`` (Python's audit events), to show that a rank writes nothing."""
    root, seen = str(root), []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and str(args[0]).startswith(root):
                seen.append(f"open {args[0]}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.truncate") and \
                str(args[0]).startswith(root):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return seen


def fixed_noise(x, n_bits=8, generator=None, *, noise=None):
    """Dequantisation without randomness: both set-ups see the same x̃ for an image."""
    return (x.to(torch.get_default_dtype()) + 0.5) / 2**n_bits


def test_global_batch_and_data_position():
    """Rank r's slice of 2 × B is the r-th half of the single-process batch of 2B at every step,
    epochs roll over at the same image, and one process keeps its old step-based batches."""
    n, seed = 100, 3
    position = {1: (0, 0), 2: (0, 0)}
    for step in range(12):  # 3 epochs of 4 global batches of 24 (4 images dropped per epoch)
        one, *position[1] = batch_indices(n, 24, *position[1], seed)
        halves = []
        for rank in range(2):
            part, *after = batch_indices(n, 12, *position[2], seed, rank, 2)
            halves.append(part)
        position[2] = after
        assert torch.equal(torch.cat(halves), one) and position[1] == position[2]
        epoch, k = divmod(step, n // 24)  # the single-process order before this issue
        old = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert torch.equal(one, old[k * 24:(k + 1) * 24])
    assert position[1] == [2, 96]
    with pytest.raises(ValueError, match="fewer than one batch of 128 \\(64 × 2 processes\\)"):
        batch_indices(n, 64, 0, 0, seed, 0, 2)
    # a checkpoint from before the data position was saved: derived from its step
    old_payload = {"run_state": {"step": 1130, "best_valid_bpd": 5.0, "nonfinite_steps": 0},
                   "train_config": {"batch_size": 16}}
    state = RunState.from_checkpoint(old_payload, 9000)  # 562 batches per epoch
    assert (state.step, state.epoch, state.epoch_offset) == (1130, 2, 6 * 16)


def step_config(run_dir: Path, batch_size: int, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(run_dir=str(run_dir), steps=1, batch_size=batch_size,
                                 eval_every=1, eval_images=41, sample_every=1000,
                                 sample_count=4, checkpoint_every=1000, progress=False),
                          **overrides})


# name: (dtype, memory-saving mode, synchronised batch norm)
VARIANTS = {"float32": (torch.float32, "none", True), "float64": (torch.float64, "none", True),
            "invertible": (torch.float64, "invertible", True),
            "checkpoint": (torch.float64, "checkpoint", True),
            "unsynced": (torch.float32, "none", False)}


def one_step(run_dir: Path, batch_size: int, variant: str) -> tuple[Trainer, dict]:
    """A fresh run of one step: the trainer and the step's (clipped) gradients."""
    dtype, mode, sync = VARIANTS[variant]
    torch.set_default_dtype(dtype)
    try:
        trainer = Trainer(MODEL, step_config(run_dir / variant, batch_size, sync_batchnorm=sync))
        trainer.model.set_memory_mode(mode)
        trainer.run()
    finally:
        torch.set_default_dtype(torch.float32)
    return trainer, {n: p.grad for n, p in trainer.model.named_parameters()}


def _one_step_worker(rank: int, world: int, run_dir: Path, batch_size: int, out: Path) -> None:
    realnvp.train.dequantize = realnvp.model.dequantize = fixed_noise
    writes = watch_writes(run_dir)
    for variant in VARIANTS:
        trainer, grads = one_step(run_dir, batch_size, variant)
        assert trainer.global_batch_size == world * batch_size
        torch.save({"state": trainer.model.state_dict(), "grads": grads},
                   out / f"{variant}-{rank}.pt")
    (out / f"writes-{rank}.json").write_text(json.dumps(writes))


def metrics(run_dir: Path) -> dict:
    merged: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        merged.update(json.loads(line))
    return merged


def largest_difference(a: dict, b: dict) -> float:
    """Largest difference, relative for entries larger than 1 (running variances reach ~1e2,
    where float32 rounding alone is ~1e-5)."""
    return max(((a[k].double() - v.double()).abs() / v.double().abs().clamp(min=1)).max().item()
               for k, v in b.items() if v.is_floating_point())


def test_two_ranks_match_one_rank_with_twice_the_batch(tmp_path, one_thread_env, monkeypatch):
    """One step: 2 ranks × batch 8 with synchronised batch norm (flow and s/t networks) equals 1
    rank × batch 16: the loss, the gradients, the parameters after the Adam step, the running
    statistics and the validation bits/dim (41 images in uneven shards, gathered).

    float32: loss and gradients within 1e-5 (measured ≤ 1e-6), running statistics within 3e-5
    relative (measured 6e-6: PyTorch's channels-last batch norm sums in float32). Not the
    parameters: Adam's first step, lr·g/(|g| + 1e-8), turns rounding-level differences of
    near-zero gradients (~2e-7 on gradients of ~2e-6) into parameter changes of up to ~1.5e-5.
    float64 shows it is the same function: everything, parameters included, within 1e-5
    (measured ≤ 3e-11), also with the memory-saving modes. Without synchronisation the ranks
    still end with equal (averaged) running statistics, but compute another function.
    """
    out = tmp_path / "out"
    out.mkdir()
    spawn(_one_step_worker, 2, tmp_path / "two", 8, out)
    monkeypatch.setattr(realnvp.train, "dequantize", fixed_noise)
    monkeypatch.setattr(realnvp.model, "dequantize", fixed_noise)
    single = {v: one_step(tmp_path / "one", 16, v) for v in ("float32", "float64")}
    for variant, (dtype, _, sync) in VARIANTS.items():
        trainer, grads = single["float64" if dtype == torch.float64 else "float32"]
        two, rank1 = (torch.load(out / f"{variant}-{r}.pt") for r in range(2))
        assert all(torch.equal(two["state"][k], v) for k, v in rank1["state"].items())
        loss2 = metrics(tmp_path / "two" / variant)
        loss1 = metrics(trainer.run_dir)
        stats = {k: v for k, v in trainer.model.state_dict().items() if "running" in k}
        differences = [abs(loss2["train_bpd"] - loss1["train_bpd"]),
                       abs(loss2["valid_bpd"] - loss1["valid_bpd"]),
                       largest_difference(two["grads"], grads),
                       largest_difference(two["state"], stats),
                       largest_difference(two["state"], trainer.model.state_dict())]
        print(variant, "loss, valid, gradients, running statistics, parameters:",
              " ".join(f"{d:.1e}" for d in differences))
        if not sync:
            assert differences[0] > 1e-4 and differences[3] > 1e-4
            continue
        loss, valid, gradients, statistics, parameters = differences
        assert loss < 1e-5 and gradients < 1e-5 and statistics < 3e-5 and valid < 1e-4
        if dtype == torch.float64:
            assert parameters < 1e-5 and valid < 1e-5
    checkpoint = load_checkpoint(tmp_path / "two" / "float32" / "checkpoints" / "ckpt-0000001.pt")
    assert checkpoint["run_state"]["epoch_offset"] == 16 and checkpoint["world_size"] == 2
    assert json.loads((out / "writes-1.json").read_text()) == []  # rank 1 wrote nothing
    assert json.loads((out / "writes-0.json").read_text())  # (the watch does see rank 0's)


def train_command(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["-m", "realnvp", "train", "--preset", "mnist", "--dataset", "mnist-t10k",
            "--data-dir", str(DEMO_DATA), "--run-dir", str(run_dir), "--steps", str(steps),
            "--batch-size", "8", "--checkpoint-every", "3", "--eval-every", "1000",
            "--eval-images", "16", "--sample-every", "1000", "--sample-count", "4",
            "--no-progress", *TINY, *extra]


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)"
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if "train_bpd" in line]


def resume_config(run_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), steps=steps, batch_size=8, checkpoint_every=3,
                       eval_every=1000, eval_images=16, sample_every=1000, sample_count=4,
                       progress=False)


def assert_resumed(trainer: Trainer, checkpoint: dict) -> None:
    """The trainer starts where the checkpoint ends: step, data position, parameters, optimiser."""
    saved = RunState.from_checkpoint(checkpoint, len(trainer.train_set))
    assert (trainer.state.step, trainer.state.epoch, trainer.state.epoch_offset) == \
        (saved.step, saved.epoch, saved.epoch_offset)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name
    for key, value in trainer.optimizer.state_dict()["state"].items():
        assert torch.equal(value["exp_avg"], checkpoint["optimizer"]["state"][key]["exp_avg"])


def _resume_worker(rank: int, world: int, run_dir: Path, steps: int, out: Path) -> None:
    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    writes = watch_writes(run_dir)
    trainer = Trainer(MODEL, resume_config(run_dir, steps))
    assert_resumed(trainer, checkpoint)
    trainer.run()
    (out / f"writes-{rank}.json").write_text(json.dumps(writes))


def test_resume_across_world_sizes(tmp_path, one_thread_env):
    """2 processes (torchrun, stopped by SIGTERM) → 1 process → 2 processes: the stopped run
    checkpoints the step it reached, and each run resumes at the step, the data position (in
    images) and the parameters of the last checkpoint, then trains on; only rank 0 writes."""
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    # 1. torchrun, 2 processes × batch 8, sent SIGTERM once 4 steps are logged, as a scheduler
    # does before it preempts a job: to every process, so that each worker gets it twice,
    # directly and passed on by torchrun
    log = tmp_path / "torchrun.log"
    with open(log, "w") as stdout:
        job = subprocess.Popen([str(TORCHRUN), "--nproc-per-node", "2", "--master-addr",
                                "127.0.0.1", "--master-port", str(free_port()),
                                *train_command(run, 1000, "--log-every", "1")], stdout=stdout,
                               stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while len(logged_steps(run)) < 4 and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = child_processes(job.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=60)
    text = log.read_text()
    assert latest_checkpoint(run) is not None, text
    assert "2 processes (cpu) × batch 8 = global batch 16; synchronised batch norm" in text, text
    assert text.count("model: ") == 1  # only rank 0 prints
    first = load_checkpoint(latest_checkpoint(run))
    k = first["run_state"]["step"]
    assert k >= 4 and first["world_size"] == 2
    assert logged_steps(run)[-1] == k  # no step lost, whether or not k is a multiple of 3
    assert f"SIGTERM: saved {latest_checkpoint(run)} at step {k}" in text, text
    assert first["run_state"]["epoch_offset"] == 16 * k  # the global batch is 2 × 8

    # 2. one process resumes it (2 → 1) and trains 3 steps of 8 images
    trainer = Trainer(MODEL, resume_config(run, k + 3))
    assert_resumed(trainer, first)
    trainer.run()
    second = load_checkpoint(latest_checkpoint(run))
    assert second["run_state"]["step"] == k + 3 and second["world_size"] == 1
    assert second["run_state"]["epoch_offset"] == 16 * k + 3 * 8

    # 3. two processes resume that (1 → 2) and train 3 steps of 2 × 8 images
    spawn(_resume_worker, 2, run, k + 6, out)
    third = load_checkpoint(latest_checkpoint(run))
    assert third["run_state"]["step"] == k + 6 and third["world_size"] == 2
    assert third["run_state"]["epoch_offset"] == 16 * k + 3 * 8 + 3 * 16
    for name, value in third["state_dict"].items():
        if "weight_v" in name:  # training went on
            assert not torch.equal(value, second["state_dict"][name]), name
    assert json.loads((out / "writes-1.json").read_text()) == []  # rank 1 wrote nothing
    assert json.loads((out / "writes-0.json").read_text())


def _nan_on_rank_one_worker(rank: int, world: int, run_dir: Path, out: Path) -> None:
    """Step 2 of 3 gets a NaN batch on rank 1 only."""
    real = realnvp.train.dequantize
    calls = [0]

    def dequantize(x, generator=None):
        calls[0] += 1
        y = real(x, generator=generator)
        return torch.full_like(y, float("nan")) if rank == 1 and calls[0] == 2 else y

    realnvp.train.dequantize = dequantize
    # unsynchronised batch norm: rank 0's own loss stays finite, only the averages are NaN
    trainer = Trainer(MODEL, step_config(run_dir, 8, sync_batchnorm=False))
    states = []
    for _ in range(3):
        images, labels = trainer.next_batch()
        trainer.training_step(images, labels, 1e-3)
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    torch.save(states, out / f"states-{rank}.pt")


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, one_thread_env):
    """The loss and the gradients are averaged over the processes before the skip is decided
    (on the device), so one rank's NaN makes every rank skip that step, its own batch-norm
    statistics included, and the ranks' parameters stay identical."""
    out = tmp_path / "out"
    out.mkdir()
    spawn(_nan_on_rank_one_worker, 2, tmp_path / "run", out)
    ranks = [torch.load(out / f"states-{r}.pt") for r in range(2)]
    for r in range(2):
        after_1, after_2, after_3 = ranks[r]
        assert all(torch.equal(after_2[k], v) for k, v in after_1.items())  # skipped
        assert any(not torch.equal(after_3[k], v) for k, v in after_2.items())  # trained on
    names = {name for name, _ in realnvp.model.RealNVP(MODEL).named_parameters()}
    for k in names:  # the same parameters on both ranks (running statistics are per rank)
        assert torch.equal(ranks[0][2][k], ranks[1][2][k]), k


def _bad_image_worker(rank: int, world: int, run_dir: Path, out: Path, where: str) -> None:
    """One rank alone meets a file it cannot decode: rank 1 in its third training batch or in
    its validation shard; or ("validation-uneven": 513 images, 2 batches on rank 0, 1 on rank
    1) rank 0 in its second validation batch, while rank 1 has finished its shard."""
    uneven = where == "validation-uneven"
    trainer = Trainer(MODEL, step_config(run_dir, 8, steps=4, eval_every=2,
                                         eval_images=513 if uneven else 8))
    dataset = trainer.train_set if where == "training" else trainer.valid_set
    read, calls = dataset.get_batch, [0]
    bad_rank, bad_call = (0, 2) if uneven else (1, 3 if where == "training" else 1)

    def get_batch(*args):
        calls[0] += 1
        if rank == bad_rank and calls[0] == bad_call:
            raise DatasetError("x/07.png: cannot decode image (truncated)")
        return read(*args)

    dataset.get_batch = get_batch
    start = time.time()
    try:
        trainer.run()
    except DatasetError as error:
        (out / f"error-{rank}.json").write_text(json.dumps(
            {"message": str(error), "step": trainer.state.step, "s": time.time() - start}))


@pytest.mark.parametrize("where", ["training", "validation", "validation-uneven"])
def test_a_bad_image_on_one_rank_stops_every_rank_at_once(tmp_path, one_thread_env, where):
    """Not one process stopping and the others waiting in the next collective until its timeout
    (gloo's: 30 minutes): every rank raises, the same step reached."""
    out = tmp_path / "out"
    out.mkdir()
    spawn(_bad_image_worker, 2, tmp_path / "run", out, where)
    errors = [json.loads((out / f"error-{r}.json").read_text()) for r in range(2)]
    bad = 0 if where == "validation-uneven" else 1
    assert "07.png: cannot decode" in errors[bad]["message"]
    what = "training batch" if where == "training" else "validation images"
    assert f"another process could not read its {what}" in errors[1 - bad]["message"]
    assert errors[0]["step"] == errors[1]["step"] == 2
    assert all(e["s"] < 120 for e in errors)


def _own_data_worker(rank: int, world: int, run_dir: Path, data_dirs: list[str],
                     out: Path) -> None:
    """Each rank reads its own copy of the data (as on nodes with local disks)."""
    start = time.time()
    try:
        Trainer(MODEL, step_config(run_dir, 8, dataset="npz", data_dir=data_dirs[rank],
                                   valid_size=8))
        result = {"error": None}
    except (DatasetError, RuntimeError) as error:
        result = {"error": type(error).__name__, "message": str(error)}
    (out / f"result-{rank}.json").write_text(json.dumps({**result, "s": time.time() - start}))


def _npz(path: Path, pixels: np.ndarray) -> str:
    np.savez(path, x_train=pixels)
    return str(path)


def test_every_rank_checks_its_data_against_rank_zeros(tmp_path, one_thread_env):
    """Rank 1's copy of the data with one pixel changed (as many images): both ranks refuse
    to start, naming rank 1 and the changed split's CRC; a copy rank 1 cannot read
    stops rank 0 too, instead of leaving it in the next collective; the same copy starts."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    same = _npz(tmp_path / "same.npz", pixels)
    other = pixels.copy()
    other[3, 5, 5, 0] ^= 1
    cases = {"same": [same, same],
             "changed": [same, _npz(tmp_path / "changed.npz", other)],
             "missing": [same, str(tmp_path / "missing.npz")]}
    results = {}
    for case, data_dirs in cases.items():
        out = tmp_path / case
        out.mkdir()
        spawn(_own_data_worker, 2, tmp_path / f"run-{case}", data_dirs, out)
        results[case] = [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["error"] for r in results["same"]] == [None, None]
    for r in results["changed"]:
        assert r["error"] == "DatasetError"
        assert "rank 1's data in" in r["message"] and "changed.npz" in r["message"]
        # the changed image is in one split: that split's CRC, not the counts or positions
        assert ("train content" in r["message"]) != ("valid content" in r["message"])
        assert "train images" not in r["message"] and "positions" not in r["message"]
    assert results["missing"][1]["error"] == "DatasetError"
    assert "missing.npz" in results["missing"][1]["message"]
    assert results["missing"][0]["error"] == "DatasetError"
    assert "another process could not read its data files" in results["missing"][0]["message"]
    assert all(r["s"] < 60 for case in results.values() for r in case)


def _stopped_in_validation_worker(rank: int, world: int, run_dir: Path, out: Path,
                                  resumed: bool) -> None:
    """Validation of 513 images: rank 0's shard has 2 batches, rank 1's 1. Rank 1 gets a
    SIGTERM while it scores its batch of step 3 (or, resumed, step 6's)."""
    trainer = Trainer(MODEL, step_config(run_dir, 8, steps=6, eval_every=3, eval_images=513,
                                         checkpoint_every=1000))
    pending = trainer.state.pending
    read, batches = trainer.valid_set.get_batch, []

    def get_batch(*args):
        batches.append(trainer.state.step)
        if rank == 1 and trainer.state.step == (6 if resumed else 3):
            os.kill(os.getpid(), signal.SIGTERM)
        return read(*args)

    trainer.valid_set.get_batch = get_batch
    try:
        trainer.run()
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    (out / f"rank-{rank}.json").write_text(json.dumps(
        {"code": code, "batches": batches, "pending": pending}))


def test_a_stop_during_validation_stops_every_rank_after_its_batch(tmp_path, one_thread_env):
    """A SIGTERM on rank 1 during its (shorter) validation shard: rank 0 stops before its next
    batch instead of scoring the rest, every rank exits with 143, the checkpoint of step 3 has
    its validation pending, and the resumed run validates step 3 first."""
    out = tmp_path / "out"
    for resumed in (False, True):
        out.mkdir()
        spawn(_stopped_in_validation_worker, 2, tmp_path / "run", out, resumed)
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
        assert [r["code"] for r in ranks] == [128 + signal.SIGTERM] * 2
        if not resumed:
            assert [r["batches"] for r in ranks] == [[3], [3]]  # rank 0 scored 1 of its 2
            assert [r["pending"] for r in ranks] == [[], []]
        else:  # step 3's whole validation first, then step 6's cut short the same way
            assert [r["batches"] for r in ranks] == [[3, 3, 6], [3, 6]]
            assert [r["pending"] for r in ranks] == [["evaluate"]] * 2
        saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))["run_state"]
        assert (saved["step"], saved["pending"]) == ((6, ["evaluate", "sample", "checkpoint"])
                                                     if resumed else (3, ["evaluate"]))
        shutil.rmtree(out)
    valid = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if "valid_bpd" in line]
    assert [r["step"] for r in valid] == [3]


def _agreed_signal_worker(rank: int, world: int, out: Path) -> None:
    ctx = setup("cpu")
    asked = [(None, None), (None, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)]
    agreed = [agreed_signal(ctx, pair[rank]) for pair in asked]
    (out / f"agreed-{rank}.json").write_text(json.dumps(agreed))


def test_every_rank_learns_the_signal_any_rank_got(tmp_path, one_thread_env):
    """No signal: None everywhere; one rank's SIGINT reaches the other; SIGTERM wins over SIGINT
    (a scheduler's preemption over a Ctrl-C)."""
    spawn(_agreed_signal_worker, 2, tmp_path)
    for rank in range(2):
        agreed = json.loads((tmp_path / f"agreed-{rank}.json").read_text())
        assert agreed == [None, signal.SIGINT, signal.SIGTERM]


def _poll_release_worker(rank: int, world: int, out: Path) -> None:
    ctx = setup("cpu")
    polled: list[torch.Tensor] = []
    all_reduce = torch.distributed.all_reduce

    def keep(tensor, *args, **kwargs):
        polled.append(tensor)
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = keep
    held = 0
    for i in range(500):
        assert max_each_over_processes(ctx, [i, rank]) == [i, 1]
        held += polled.pop()._use_count() > 1  # a C++ reference besides Python's
    (out / f"held-{rank}.json").write_text(json.dumps(held))


def test_a_poll_returns_only_when_gloo_has_let_go_of_its_tensor(tmp_path, one_thread_env):
    """gloo's worker thread, still holding a small all-reduce's tensor after the call returned
    (about 15 % of them), would need the GIL to free it; at process exit that aborts the
    process (SIGABRT after a clean end). A poll waits: no tensor of 500 polls still held."""
    spawn(_poll_release_worker, 2, tmp_path)
    assert [json.loads((tmp_path / f"held-{r}.json").read_text()) for r in range(2)] == [0, 0]


def test_an_epoch_that_divides_into_batches_uses_every_image():
    """32 images, batches of 16: both batches of an epoch are used (the last one fits exactly),
    together they are the epoch's permutation, and the third step starts epoch 1."""
    first, *position = batch_indices(32, 16, 0, 0, seed=1)
    second, *position = batch_indices(32, 16, *position, seed=1)
    assert sorted(torch.cat([first, second]).tolist()) == list(range(32))
    third, *position = batch_indices(32, 16, *position, seed=1)
    assert position == [1, 16] and not torch.equal(third, first)
