"""Multi-process training: 2 CPU processes (torchrun, gloo) against one process with the same global batch.

What must hold (synth.training, flows.distributed, privacy.dp): each rank computes its slice of the global batch a
single process would draw, with the same per-row noise and timesteps, so the weights equal the one-process run's
up to float summation order; with DP-SGD the one ledger (rank 0's) has the single-process σ, q, steps, δ and ε.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from flows.distributed import WorkerFailed, launch_training
from privacy.dp import DPConfig, make_strategy
from synth.artifacts import read_header
from synth.checkpoint import default_checkpoint_dir, has_checkpoint
from synth.errors import ConfigError
from synth.train_config import TrainConfig
from synth.training import World, make_scheduler, per_row_loss, train

torch.set_num_threads(1)

# 64 train images, batch 15: 4 batches an epoch, so 6 steps cross an epoch boundary; 2 ranks get unequal slices
# (7 and 8 examples), so a rank that backpropagated the mean of its own slice instead of its share of the global
# mean would show. K=2 noise draws per example exercise the row slicing (and, with DP, the fold before clipping).
CONFIG = TrainConfig(preset="tiny", batch_size=15, max_steps=6, noise_multiplicity=2, checkpoint_every=2)
# rdp: calibrates in well under a second in every worker; the accountant choice is not what is under test.
# max_physical_batch_size=2: the Poisson batch (15, 25, 13, … examples in this run) goes through in chunks of 2
# and, for odd sizes, one chunk of 1: both ranks compute one example of a 2-chunk, and in a 1-chunk rank 0's slice
# is empty (it takes the clipped-sum-of-nothing path; counted 5 times in this run). The optimizer accumulates the
# chunks and steps once per Poisson batch, as in one process.
DP = DPConfig(target_epsilon=10.0, accountant="rdp", max_physical_batch_size=2)

# Tolerances, from measurements on this CPU, with their reasons:
# Without DP, the two ranks' gradients are summed by an all-reduce instead of inside one backward pass: the same
# sum in a different float32 order (~1e-7 relative). Over these 6 AdamW steps the weights (|w| up to ~3) moved
# apart by 2.4e-6 at most. With one real error in the split (each rank backpropagating the mean of its own 7- or
# 8-example slice) they moved apart by 2.1e-3; different per-row noise or a dropped slice do far more.
ATOL = 2.5e-5
# With DP the per-example gradients are computed and clipped one example at a time either way and rank 0 adds the
# same noise from the same RNG stream: measured 1.5e-8 apart. Noise added twice or clipping per rank would move
# the weights by ~lr.
DP_ATOL = 1e-6


def weights(model: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model / sub / "diffusion_pytorch_model.safetensors")


def max_weight_diff(a: Path, b: Path) -> float:
    worst = 0.0
    for sub in ("unet", "unet_ema"):
        wa, wb = weights(a, sub), weights(b, sub)
        assert wa.keys() == wb.keys()
        worst = max(worst, max(float((wa[k] - wb[k]).abs().max()) for k in wa))
    return worst


def card(model: Path) -> dict:
    return read_header(model, "model_card.json", kind="model")


@pytest.fixture(scope="module")
def single(pneumonia_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process reference run, in this process."""
    return train(pneumonia_slice, tmp_path_factory.mktemp("single") / "model", CONFIG, progress=False)


# -- fast: the pieces -----------------------------------------------------------------------------------------


def test_rank_slices_cover_the_batch() -> None:
    for size in (1, 2, 3, 4):
        for n in (size, 7, 15, 16):
            parts = [World(rank=r, size=size).part(n) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))  # contiguous, in rank order
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_per_row_loss_slices_use_the_single_process_draws() -> None:
    """Each rank's rows are exactly the single-process rows of its examples, and every rank leaves the noise
    generator where the single process leaves it (an empty slice skips the model but still draws)."""
    from synth.model import build_unet, preset

    torch.manual_seed(0)
    unet = build_unet(preset("tiny")).eval()
    sched = make_scheduler(CONFIG)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 28, 28, generator=g) * 2 - 1
    conditions = torch.tensor([0, 1, 1, 0, 1])
    kw = {"null_condition": 2, "noise_multiplicity": 2, "cfg_dropout": 0.5}

    def run(part):
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            rows = per_row_loss(unet, sched, images, conditions, generator=gen, part=part, **kw)
        return rows, gen.get_state()

    full, after = run(None)
    for size in (2, 3):
        pieces = [run(World(rank=r, size=size).part(5)) for r in range(size)]
        torch.testing.assert_close(torch.cat([rows for rows, _ in pieces]), full, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(state, after) for _, state in pieces)
    empty, state = run((3, 3))
    assert empty.shape == (0,) and torch.equal(state, after)
    with pytest.raises(ValueError, match="part"):
        run((4, 6))


def test_bad_nproc_is_a_one_line_error(pneumonia_slice: Path, tmp_path: Path, capsys) -> None:
    from flows.cli import run

    out = tmp_path / "model"
    for nproc, message in ((0, "nproc 0 must be an integer >= 1"), (16, "nproc 16 exceeds batch_size 15")):
        with pytest.raises(ConfigError, match=message):
            launch_training(pneumonia_slice, out, CONFIG, nproc=nproc)
    with pytest.raises(ConfigError, match="backend 'mpi'"):
        launch_training(pneumonia_slice, out, CONFIG, nproc=2, backend="mpi")
    assert run(["train", str(pneumonia_slice), "--out", str(out), "--preset", "tiny", "--nproc", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--nproc 0" in err and "\n" not in err
    assert not out.exists()


# -- slow: real process groups --------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(pneumonia_slice: Path, single: Path, tmp_path: Path) -> None:
    out = launch_training(pneumonia_slice, tmp_path / "model", CONFIG, nproc=2, threads=1)
    assert max_weight_diff(out, single) < ATOL
    got, ref = card(out), card(single)
    assert got["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in ref
    assert (got["steps"], got["examples_seen"], got["ema"]["updates"]) == (6, 6 * 15, 6)
    assert got["examples_seen"] == ref["examples_seen"]
    # the reported loss is the global batch's (all ranks' rows), not rank 0's slice
    assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    assert not default_checkpoint_dir(out).exists()


@pytest.mark.slow
def test_dp_two_processes_keep_the_single_process_ledger(pneumonia_slice: Path, tmp_path: Path) -> None:
    ref = train(pneumonia_slice, tmp_path / "single", CONFIG,
                privacy=make_strategy(DP, dataset_size=64, noise_multiplicity=2), progress=False)
    out = launch_training(pneumonia_slice, tmp_path / "model", CONFIG, nproc=2, threads=1, dp=DP)
    ledger, ref_ledger = (json.loads((m / "privacy_ledger.json").read_text()) for m in (out, ref))
    for key in ("events", "steps", "delta", "epsilon", "accountant", "max_grad_norm", "noise_multiplicity",
                "dataset_size", "batch_size"):
        assert ledger[key] == ref_ledger[key], key
    assert ledger["steps"] == 6 and len(ledger["events"]) == 1
    event = ledger["events"][0]
    assert event["sample_rate"] == 0.25 and event["steps"] == 6 and event["noise_multiplier"] > 0
    assert card(out)["privacy"]["epsilon"] == card(ref)["privacy"]["epsilon"] <= 10.0
    # Same Poisson batches, same per-row draws, same noise (added once, on rank 0, from the same RNG stream).
    assert max_weight_diff(out, ref) < DP_ATOL
    assert card(out)["examples_seen"] == card(ref)["examples_seen"]


FAULTY_WORKER = '''
"""flows.distributed's worker, except that rank 1 raises at its third step."""
import os
import sys

import synth.training as training
from flows import distributed

if os.environ.get("RANK") == "1":
    real = training.train

    def train(*args, **kwargs):
        def on_step(step, loss):
            if step == 3:
                raise RuntimeError("injected failure at step 3")

        return real(*args, on_step=on_step, **kwargs)

    training.train = train

sys.exit(distributed.main())
'''


@pytest.mark.slow
def test_worker_failure_is_one_line_and_the_run_resumes(
    pneumonia_slice: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (tmp_path / "faulty_worker.py").write_text(FAULTY_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the launcher's run folder (kept on failure)
    out = tmp_path / "model"
    with pytest.raises(WorkerFailed) as info:
        launch_training(pneumonia_slice, out, CONFIG, nproc=2, threads=1, worker="faulty_worker")
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    # The root cause, not rank 0's "connection closed by peer" that followed it; the full log is kept.
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 3" in message
    log = Path(message.rsplit("log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "injected failure" in log.read_text()
    assert not out.exists() and not list(tmp_path.glob("model.tmp*"))  # nothing half-written
    ckpt = default_checkpoint_dir(out)
    assert has_checkpoint(ckpt) and json.loads((ckpt / "checkpoint.json").read_text())["step"] == 2

    # Resume through the CLI (which takes launch_training for --nproc > 1): same weights as the uninterrupted run.
    from flows.cli import run

    args = ["train", str(pneumonia_slice), "--out", str(out), "--preset", "tiny", "--batch-size", "15",
            "--max-steps", "6", "--noise-multiplicity", "2", "--checkpoint-every", "2", "--nproc", "2",
            "--no-progress"]
    assert run(args) == 2  # a checkpoint is there: the CLI asks for --resume instead of starting over
    assert "--resume" in capsys.readouterr().err
    assert run([*args, "--resume"]) == 0
    assert card(out)["resumed_from_step"] == 2 and card(out)["steps"] == 6
    assert max_weight_diff(out, single) < ATOL
    assert not ckpt.exists()
