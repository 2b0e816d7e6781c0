"""The training loop: epochs of batches, one optimizer step each, until a stopping rule or a signal.

A step: every rank computes its slice of the global batch's per-row losses and backpropagates (its share of) the
mean, the privacy strategy folds and clips (or, without one, the gradient norm is clipped), the LR is set from
the step number and the optimizer steps. Only real steps (not physical batches accumulating a logical one) count:
they update the EMA (rank 0), agree the loss, clock and stop requests over the ranks, and may checkpoint.
Ctrl-C / SIGTERM stop at the next step boundary with a checkpoint (`StopSignals`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from synth.device import autocast
from synth.diffusion_loss import learning_rate, per_row_loss
from synth.train_progress import _progress_bar, _say, _update_bar
from synth.train_run import Run, save_checkpoint_of, save_snapshot_of, snapshot_due
from synth.train_state import StopSignals, limit_reached
from synth.train_world import agree, barrier

EPSILON_EVERY_S = 15.0  # recomputing ε costs an accountant call; refresh the progress bar's ε at most this often


class _Loop:
    """The loop over one run, with the state that only lives while it runs (progress bar, pending loss, ...)."""

    def __init__(self, run: Run, *, progress: bool, on_step: Callable[[int, float], None] | None,
                 report: bool = True):
        self.run = run
        self.on_step = on_step
        main = run.world.main
        # `report=False` (the step-rate probe): no progress lines at all, not even the throttled log ones.
        self.bar = _progress_bar(main and report, show_bar=progress, total=run.planned, initial=run.state.step,
                                 private=run.privacy is not None)
        self.amp = autocast(run.device)
        self.signals = StopSignals()
        self.consistent = True  # the in-memory state is exactly "after real step `state.step`"
        self.pending_loss, self.pending_rows = 0.0, 0
        self.last_eps_time, self.eps = 0.0, None
        self.started = time.monotonic() - run.state.elapsed_s

    def say(self, message: str) -> None:
        if self.run.world.main:
            _say(self.bar, message)

    def run_to_the_end(self) -> str:
        """Train until a stopping rule is met; return its name. Interrupts checkpoint and re-raise."""
        run = self.run
        stop_reason: str | None = None
        run.optimizer.zero_grad(set_to_none=True)
        try:
            with self.signals.installed():
                while stop_reason is None:
                    stop_reason = limit_reached(run.config, run.state, epoch_end=True) or self._epoch()
        except (KeyboardInterrupt, SystemExit):
            state = run.state
            if self.consistent and state.step != run.last_saved:
                save_checkpoint_of(run)
                self.say(f"interrupted: checkpoint at step {state.step} in {run.ckpt_dir}; rerun with --resume")
            elif run.last_saved >= 0 and not (self.consistent and state.step == run.last_saved):
                self.say(f"interrupted mid-step: the checkpoint in {run.ckpt_dir} is from step {run.last_saved}")
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        run.restore_privacy_state()  # stopped before the loader was reached
        return stop_reason

    def _epoch(self) -> str | None:
        """The rest of the current epoch; a stopping rule's name if one was met within it."""
        run, state = self.run, self.run.state
        if state.batch_in_epoch == 0:
            state.epoch_rng = run.loader_gen.get_state()
        elif state.epoch_rng is not None:  # resuming mid-epoch: replay the epoch's draws, skip used batches
            run.loader_gen.set_state(state.epoch_rng)
        batches = iter(run.loader)
        for _ in range(state.batch_in_epoch):
            next(batches)
        run.restore_privacy_state()
        for images, conditions in batches:
            self.consistent = False
            state.batch_in_epoch += 1
            self._step(images, conditions)
            if run.privacy is not None and not run.privacy.is_real_step(run.optimizer):
                continue
            stop_reason = self._after_real_step()
            if stop_reason is not None:
                return stop_reason
        state.epoch += 1
        state.batch_in_epoch = 0
        return None

    def _step(self, images: torch.Tensor, conditions: torch.Tensor) -> None:
        """Forward and backward of this rank's slice of the global batch, then one optimizer step."""
        run, config, world = self.run, self.run.config, self.run.world
        b = int(images.shape[0])  # the global batch: every rank holds all of it
        lo, hi = world.part(b)
        if b > 0:
            rows = per_row_loss(
                run.model, run.scheduler, images.to(run.device, non_blocking=True),
                conditions.to(run.device, non_blocking=True), null_condition=run.model_cfg.null_condition,
                generator=run.noise_gen, noise_multiplicity=config.noise_multiplicity,
                cfg_dropout=config.cfg_dropout, amp=self.amp, part=(lo, hi) if world.distributed else None,
                min_snr_gamma=config.min_snr_gamma,
            )
            if rows.shape[0] and run.privacy is None and world.distributed:
                # DDP averages the ranks' gradients; slices may differ by one example, so each rank
                # backpropagates its share of the global mean, times the world size.
                (rows.sum() * (world.size / (b * config.noise_multiplicity))).backward()
            elif rows.shape[0]:
                rows.mean().backward()  # DP: Opacus recovers per-row gradients from the local mean
            self.pending_loss += float(rows.detach().sum())
            self.pending_rows += rows.shape[0]
        if run.privacy is not None:
            run.privacy.after_backward(run.model, hi - lo)
        elif config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(run.unet.parameters(), config.grad_clip)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(config, run.state.step + 1, run.planned)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.state.examples += b

    def _after_real_step(self) -> str | None:
        """Bookkeeping of a real optimizer step: EMA, the agreed loss and clock, progress, stop requests and
        checkpoints. Returns a stopping rule's name if one is met."""
        run, state, world = self.run, self.run.state, self.run.world
        state.step += 1
        if world.main:
            run.ema.step(run.raw.parameters())
            if snapshot_due(run):
                save_snapshot_of(run)
        state.elapsed_s = time.monotonic() - self.started
        agreed: int | None = None
        if world.distributed:
            self.pending_loss, self.pending_rows, state.elapsed_s, agreed = agree(
                world, run.device, self.pending_loss, self.pending_rows, state.elapsed_s, self.signals.received
            )
        loss = self.pending_loss / self.pending_rows if self.pending_rows else float("nan")
        state.losses.append(loss)
        self.pending_loss, self.pending_rows = 0.0, 0
        self.consistent = True

        if run.privacy is not None and self.bar is not None and time.monotonic() - self.last_eps_time > EPSILON_EVERY_S:
            self.eps, self.last_eps_time = run.privacy.epsilon(), time.monotonic()
        _update_bar(self.bar, state, self.eps)
        if self.on_step is not None:
            self.on_step(state.step, loss)
        # In a process group the ranks stop together: on any rank's signal, as agreed above.
        received = agreed if world.distributed else self.signals.received
        if received is not None:
            self.signals.received = received
            save_checkpoint_of(run)
            barrier(world)  # keep every rank alive until rank 0's checkpoint is on disk
            self.say(f"interrupted: checkpoint at step {state.step} in {run.ckpt_dir}; rerun with --resume")
            raise self.signals.stop()
        stop_reason = limit_reached(run.config, state, epoch_end=False)
        if stop_reason is None and run.config.checkpoint_every and state.step % run.config.checkpoint_every == 0:
            save_checkpoint_of(run)
        return stop_reason


def step_function(run: Run) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step of `run` (forward, backward, optimizer step) without the loop's bookkeeping: what the
    DP step-rate probe times (`synth.step_fit`)."""
    return _Loop(run, progress=False, on_step=None, report=False)._step


def run_loop(run: Run, *, progress: bool, on_step: Callable[[int, float], None] | None) -> str:
    """Train `run` until a stopping rule is met and return its name ("max_steps", "max_minutes" or "epochs").

    Ctrl-C or SIGTERM stop at the next step boundary, save a checkpoint and re-raise KeyboardInterrupt /
    SystemExit(143) (in a process group, on every rank together). `on_step(step, loss)` follows every real step.
    """
    return _Loop(run, progress=progress, on_step=on_step).run_to_the_end()
