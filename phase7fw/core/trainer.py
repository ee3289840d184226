"""The training loop: one optimizer step = ``grad_accum_steps`` micro-batches.

Per step: forward/backward every micro-batch under autocast (loss divided by the number of
micro-batches), unscale (fp16), clip to ``grad_clip`` and measure the global grad norm, then
either update or -- when the loss or the grad norm is NaN/Inf -- skip the update, count it,
and stop after ``train.max_nonfinite_steps`` skips in a row. The step counter, the LR and
curvature schedules and the data position advance either way, so a skipped step is a
step whose update was dropped, not a step that is retried.

With ``train.optimizer_in_backward`` each parameter is updated inside backward instead
(:meth:`Trainer._train_step_in_backward`, :class:`phase7fw.core.memory.OptimizerInBackward`).

Ctrl-C (:meth:`Trainer._on_sigint`) finishes the running step and saves, but never waits for
a long one: in the first step of the process there is nothing new to save (stop at once);
a later step expected to need more than ``ROLLBACK_AFTER_S`` more, still in forward/backward
(no weight changed yet), is dropped -- its start's data position and RNG states are restored
and the step before is saved. A second Ctrl-C stops without saving.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings

import torch

from phase7fw.core import distributed
from phase7fw.core.checkpoint import checkpoint_path
from phase7fw.core.console import perplexity, step_line, val_line
from phase7fw.errors import TrainingAborted
from phase7fw.fileio import write_text_atomic
from phase7fw.hookspecs import hookimpl
from phase7fw.recipe import recipe_to_dict, recipe_to_toml
from phase7fw.recipe.convert import structure_component
from phase7fw.core.run_lock import RunLock, RunLocked


#: a first Ctrl-C finishes the running step unless that would take longer than this
ROLLBACK_AFTER_S = 5.0


def _untimed(name: str):
    return contextlib.nullcontext()


class CallbackHooks:
    """A recipe ``Callback`` as lifecycle hook implementations (hookspecs.py), called after
    the plugins' (trylast); its errors stop the run like any error of the run."""

    def __init__(self, callback):
        self.callback = callback

    @hookimpl(trylast=True)
    def run_start(self, engine):
        self.callback.on_run_start(engine)

    @hookimpl(trylast=True)
    def step_end(self, engine, row):
        self.callback.on_step_end(engine, row)

    @hookimpl(trylast=True)
    def eval_end(self, engine, row):
        self.callback.on_eval_end(engine, row)

    @hookimpl(trylast=True)
    def checkpoint_saved(self, engine, path):
        self.callback.on_checkpoint(engine, path)

    @hookimpl(trylast=True)
    def run_end(self, engine, summary):
        self.callback.on_run_end(engine, summary)


class Trainer:
    track_rollback = False  # run() turns it on (bench calls train_step without it)

    def __init__(self, engine):
        self.engine = engine
        self.recipe = engine.recipe
        self.train = engine.recipe.train
        self.console = engine.console
        self.interrupted = False
        self.hard_stop = False
        self.nothing_new = False  # stopped in the first step: nothing to save
        self.trackers: list = []
        self.callbacks: list = []
        self.consecutive_bad = 0  # non-finite steps in a row
        self.train_seconds = 0.0  # wall time in training steps (evaluation and saving excluded)
        engine._trainer = self  # engine.log(row) reaches this run's trackers
        self.steps_done = 0  # optimizer steps finished by this process (0: nothing new to save)
        self.step_started = None  # perf_counter() when the running step began
        self.last_step_s = None  # duration of the last finished step
        # While a step is still in forward/backward (no weight has changed yet): the data position
        # and RNG states of its start, so a Ctrl-C can drop the step and save the one before
        self.rollback_point = None
        self.rolled_back = False
        self.last_good: str | None = getattr(engine, "resumed_from", None)  # newest checkpoint with finite weights

    # ------------------------------------------------------------------ setup
    def _build_trackers(self) -> None:
        e, r = self.engine, self.recipe
        specs = list(r.trackers)
        if not any(s.name == "jsonl" for s in specs):  # training_log.jsonl is always written
            errors: list[str] = []
            specs.insert(0, structure_component({"name": "jsonl"}, "tracker", e.registry, "trackers", errors))
        resumed = getattr(e, "resumed_from", None) is not None
        for spec in specs if e.dist.is_main else ():  # trackers live on rank 0 only
            tracker = e.registry.build(
                "tracker", spec.name, spec.config, run_dir=str(e.output_dir), run_name=r.run.name,
                recipe=recipe_to_dict(r), resume_state=e.tracker_state.get(spec.name) if resumed else None,
                resume_step=e.step,
            )
            self.trackers.append((spec.name, tracker))
        self.callbacks = [e.registry.build("callback", s.name, s.config) for s in r.callbacks]
        # The recipe's callbacks implement the lifecycle hooks for this run (trylast: after
        # the plugins'; pluggy calls trylast implementations in registration order).
        self._callback_names = []
        for i, cb in enumerate(self.callbacks):
            name = f"phase7fw.callback[{i}]:{r.callbacks[i].name}"
            e.plugins.pm.register(CallbackHooks(cb), name=name)
            self._callback_names.append(name)
        e._done("trackers")

    def _log(self, row: dict) -> None:
        for _, tracker in self.trackers:
            tracker.log(row)

    def _tracker_state(self) -> dict:
        return {name: t.state() for name, t in self.trackers}

    def _stop_requested(self) -> bool:
        """Ctrl-C reaches the ranks at slightly different times: stop when any rank saw it,
        at the same step on every rank (a tiny all-reduce per step when distributed)."""
        if not self.engine.dist.distributed:
            return self.interrupted
        flag = torch.tensor([float(self.interrupted)], device=self.engine.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.interrupted = bool(flag.item())
        return self.interrupted

    # ------------------------------------------------------------------ signals
    def _on_sigint(self, signum, frame):
        if self.interrupted:  # second Ctrl-C: stop now, without saving a half-done step
            self.hard_stop = True
            raise KeyboardInterrupt
        self.interrupted = True
        # (Under torchrun every rank must stop at the same step: the flag is shared at the end
        # of the step instead.)
        if self.steps_done == 0 and not self.engine.dist.distributed:
            # The first step of this process is running: the weights are still those of the
            # start (the resumed checkpoint, or the seeded init), so there is nothing to save
            # and no reason to wait for a step of unknown length.
            self.hard_stop = self.nothing_new = True
            raise KeyboardInterrupt
        left = None
        if self.last_step_s is not None and self.step_started is not None:
            left = self.last_step_s - (time.perf_counter() - self.step_started)
        if left is not None and left > ROLLBACK_AFTER_S and self.rollback_point is not None \
                and not self.engine.dist.distributed:
            # A long step still in forward/backward: drop it and save the step before (its
            # weights and optimizer state are untouched until the update)
            self.rolled_back = True
            raise KeyboardInterrupt
        eta = f", about {left:.0f} s" if left is not None and left >= 1 else ""
        self.console.print(f"\nInterrupted: finishing this step{eta}, then saving a checkpoint"
                           " (Ctrl-C again to quit now without saving it)")

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        """Train holding the output folder's lock (phase7fw/core/run_lock.py): a second run on the
        same folder stops here, before it writes anything."""
        e = self.engine
        lock, refused = None, None
        if e.dist.is_main:
            try:
                lock = RunLock(e.output_dir).acquire()
            except RunLocked as exc:
                refused = str(exc)
        refused = distributed.broadcast_object(refused, e.dist)  # every rank stops alike
        if refused:
            raise RunLocked(refused)
        try:
            return self._run()
        finally:
            for name in getattr(self, "_callback_names", ()):
                if e.plugins.pm.has_plugin(name):
                    e.plugins.pm.unregister(name=name)
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        e = self.engine
        if e.step >= self.train.max_steps:  # a finished run: say so and touch no file
            return {"steps": e.step, "already_complete": True, "max_steps": self.train.max_steps,
                    "final_loss": None, "last_logged_loss": None, "final_val_loss": None,
                    "best_val_loss": e.best_val_loss if math.isfinite(e.best_val_loss) else None,
                    "tokens": e.tokens_seen, "skipped_steps": e.skipped_steps, "output_dir": str(e.output_dir),
                    "final_checkpoint": getattr(e, "resumed_from", None)}
        if e.dist.is_main:
            write_text_atomic(e.output_dir / "resolved_recipe.toml", recipe_to_toml(self.recipe))
        distributed.barrier(e.dist)
        self._build_trackers()
        for line in e.describe():
            self.console.print(line)
        e.plugins.call("run_start", engine=e)
        e._done("loop")

        self.track_rollback = not e.dist.distributed
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.console.start_bar(self.train.max_steps, e.step)
        try:
            summary = self._loop()
        except KeyboardInterrupt:
            self.console.close_bar()
            if self.nothing_new:
                where = getattr(e, "resumed_from", None)
                self.console.print(f"Stopped by Ctrl-C during the first step (step {e.step + 1}): nothing new to save"
                                   + (f"; {where} still holds step {e.step}." if where else "."))
            elif self.rolled_back:
                position, rng = self.rollback_point
                e.train_sampler.position = position
                torch.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state_all(rng[1])
                path = self._save(e.step)
                self.console.print(f"Stopped by Ctrl-C during step {e.step + 1}, before its update (it would have taken"
                                   f" ~{self.last_step_s:.0f} s more); checkpoint of step {e.step} saved to {path}."
                                   " Continue with the same command and --resume auto.")
            elif self.hard_stop:
                self.console.print("Stopped by a second Ctrl-C without saving this step.")
            else:
                path = self._save(e.step)
                if path is not None:
                    self.console.print(f"Stopped by Ctrl-C at step {e.step}; checkpoint saved to {path}."
                                       " Continue with the same command and --resume auto.")
                else:
                    self.console.print(f"Stopped by Ctrl-C at step {e.step}; {self._last_good_text()}")
            raise
        finally:
            self.console.close_bar()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            for _, tracker in self.trackers:
                tracker.finish()
        e.plugins.call("run_end", engine=e, summary=summary)
        return summary

    def train_step(self, timer=None) -> dict:
        """One optimizer step: forward and backward of every micro-batch, clipping, the update
        (skipped when the loss or the grad norm is not finite), schedulers and counters.

        ``timer.section(name)``, when given, wraps the phases "data", "forward", "backward" and
        "optimizer" (``phase7fw bench`` times them). Returns loss, grad_norm, lr, finite, metrics.
        """
        e, t = self.engine, self.train
        model, opt = e.model, e.optimizer
        section = timer.section if timer is not None else _untimed
        if getattr(e, "in_backward", None) is not None:  # train.optimizer_in_backward
            return self._train_step_in_backward(section)
        if self.track_rollback:
            cuda_rng = torch.cuda.get_rng_state_all() if e.device.type == "cuda" else None
            self.rollback_point = (e.train_sampler.position, (torch.get_rng_state(), cuda_rng))
        loss_sum = torch.zeros((), device=e.device)
        metric_sums: dict[str, float] = {}
        model.begin_step()
        for i in range(t.grad_accum_steps):
            with section("data"):
                x, y = (b.to(e.device, non_blocking=True) for b in next(e.train_sampler))
            # Gradients are all-reduced only with the last micro-batch of the step.
            with distributed.gradient_sync(e._loss_fn, e.dist, enabled=i == t.grad_accum_steps - 1):
                with section("forward"), e.autocast():
                    loss, metrics = e._forward_loss(x, y)
                with section("backward"):
                    scaled = loss / t.grad_accum_steps
                    (e.scaler.scale(scaled) if e.scaler else scaled).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():  # tensors stay on the device until logged
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
        self.rollback_point = None  # from here on the step finishes
        with section("backward"):
            model.finish_backward(reduce=lambda g: distributed.all_mean(g, e.dist))
        with section("optimizer"):
            if e.scaler:
                e.scaler.unscale_(opt)
            max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            # Every rank sees the mean loss, so all of them make the same skip decision.
            loss_value = float(distributed.all_mean(loss_sum, e.dist)) / t.grad_accum_steps
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            lr = opt.param_groups[0]["lr"]
            if finite:
                if e.scaler:
                    e.scaler.step(opt)
                    e.scaler.update()
                else:
                    opt.step()
            elif e.scaler:
                e.scaler.update()  # lowers the scale for the next step
            self._end_step(finite)
        return {"loss": loss_value, "grad_norm": grad_norm, "finite": finite, "lr": lr, "metrics": metric_sums}

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks: the logged Tok/s and ``tokens`` are the
        whole job's, so a 2-GPU run can be compared with a 1-GPU run directly."""
        t = self.train
        return t.batch_size * t.grad_accum_steps * self.engine.seq_len * self.engine.dist.world_size

    def _end_step(self, finite: bool) -> None:
        """After the update (or its skip): skip counters, schedulers, step and token counters."""
        e = self.engine
        if finite:
            self.consecutive_bad = 0
        else:
            e.skipped_steps += 1
            self.consecutive_bad += 1
        e.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when the very first update was skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            e.lr_scheduler.step()
        e.step += 1
        e.tokens_seen += self.tokens_per_step
        if e.curvature_scheduler is not None:
            e.model.set_curvature(e.curvature_scheduler.value(e.step))

    def _train_step_in_backward(self, section) -> dict:
        """``train.optimizer_in_backward``: one micro-batch; each parameter is updated inside
        backward as soon as its gradient is ready (:class:`phase7fw.core.memory.OptimizerInBackward`
        says how clipping stays exact and how a non-finite step is skipped)."""
        e = self.engine
        with section("data"):
            x, y = (b.to(e.device, non_blocking=True) for b in next(e.train_sampler))

        def forward():
            e.model.begin_step()
            with section("forward"), e.autocast():
                return e._forward_loss(x, y)

        def backward(loss):  # None: no backward (skipped step), only the model's step state ends
            with section("backward"):
                if loss is not None:
                    loss.backward()
                e.model.finish_backward()

        lr = e.optimizer.param_groups[0]["lr"]
        loss_value, metrics, grad_norm, finite = e.in_backward.step(forward, backward, self.train.grad_clip, e.device)
        with section("optimizer"):
            self._end_step(finite)
        metrics = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        return {"loss": loss_value, "grad_norm": grad_norm, "finite": finite, "lr": lr, "metrics": metrics}

    def _loop(self) -> dict:
        e, t = self.engine, self.train
        e.model.train()
        self.consecutive_bad = 0
        window = {"loss": 0.0, "n": 0, "time": 0.0, "tokens": 0, "steps": 0}
        last_loss = math.nan
        self.last_logged = None  # (mean loss, first step, last step) of the last logged window
        while e.step < t.max_steps:
            t0 = self.step_started = time.perf_counter()
            result = self.train_step()
            loss_value, grad_norm, finite, lr = result["loss"], result["grad_norm"], result["finite"], result["lr"]
            metric_sums, consecutive_bad = result["metrics"], self.consecutive_bad
            dt = self.last_step_s = time.perf_counter() - t0
            self.train_seconds += dt
            self.steps_done += 1

            if finite:
                window["loss"] += loss_value
                window["n"] += 1
                last_loss = loss_value
            window["time"] += dt
            window["tokens"] += self.tokens_per_step
            window["steps"] += 1
            self.console.advance(f"loss {loss_value:.4f}")

            if not finite:
                self.console.print(f"Step {e.step:>6} | skipped: non-finite loss {loss_value} or grad norm"
                                   f" {grad_norm} ({consecutive_bad} in a row, {e.skipped_steps} in total)")
                self._log({"step": e.step, "split": "train", "loss": loss_value, "grad_norm": grad_norm,
                           "lr": lr, "skipped": True, "skipped_steps": e.skipped_steps})
                if consecutive_bad >= t.max_nonfinite_steps:
                    path = self._save(e.step)
                    where = (f"The weights are those of the last finite update, saved to {path}" if path else
                             self._last_good_text())
                    raise TrainingAborted(
                        f"stopping: {consecutive_bad} non-finite steps in a row (last at step {e.step}:"
                        f" loss {loss_value}, grad norm {grad_norm}). {where}; lower optimizer.lr, raise"
                        " lr_scheduler.warmup_steps or use precision = \"bf16\"/\"fp32\", then resume."
                    )

            if e.step % t.log_every == 0 or e.step == t.max_steps:
                self._log_window(window, lr, grad_norm, metric_sums)
                window = {"loss": 0.0, "n": 0, "time": 0.0, "tokens": 0, "steps": 0}
            if t.eval_every and e.step % t.eval_every == 0 and e.step < t.max_steps:
                self._evaluate()
            if t.save_every and e.step % t.save_every == 0:
                self._save(e.step)
            if self._stop_requested():
                raise KeyboardInterrupt

        val = self._evaluate() if e.val_sampler is not None else None
        final = self._save("final")
        if final is None:
            raise TrainingAborted(f"training reached step {e.step} with non-finite weights, so no final checkpoint"
                                  f" was written. {self._last_good_text()}")
        logged = self.last_logged
        return {
            "steps": e.step,
            "final_loss": last_loss,  # the last step's loss
            "last_logged_loss": logged[0] if logged else None,  # the mean of the last logged window
            "last_logged_steps": logged[1:] if logged else None,
            "final_val_loss": val,
            "final_val_bpb": e.last_val.get("bpb") if val is not None else None,
            "best_val_loss": e.best_val_loss if math.isfinite(e.best_val_loss) else None,
            "best_val_bpb": e.best_val_bpb if math.isfinite(e.best_val_loss) else None,
            "tokens": e.tokens_seen,
            "skipped_steps": e.skipped_steps,
            "output_dir": str(e.output_dir),
            "final_checkpoint": str(final),
        }

    def _log_window(self, window: dict, lr: float, grad_norm: float, metric_sums: dict) -> None:
        e, t = self.engine, self.train
        if window["steps"] == 0:
            return
        loss = window["loss"] / window["n"] if window["n"] else math.nan
        self.last_logged = (loss, e.step - window["steps"] + 1, e.step)
        step_time = window["time"] / window["steps"]
        tok_s = window["tokens"] / window["time"] if window["time"] > 0 else 0.0
        row = {"step": e.step, "split": "train", "loss": loss, "ppl": perplexity(loss), "lr": lr,
               "grad_norm": grad_norm, "step_time_s": step_time, "tokens_per_s": tok_s, "tokens": e.tokens_seen,
               "train_seconds": self.train_seconds, "skipped_steps": e.skipped_steps}
        row.update({k: float(v) / t.grad_accum_steps for k, v in metric_sums.items()})
        extra = {"Tok/s": f"{tok_s:,.0f}"}
        if e.curvature_scheduler is not None:
            row["curvature"] = e.curvature_scheduler.value(e.step)
            extra["Curv"] = f"{row['curvature']:.3f}"
        self.console.print(step_line(e.step, loss, lr, grad_norm, step_time, extra))
        self._log(row)
        e.plugins.call("step_end", engine=e, row=row)

    def _evaluate(self) -> float | None:
        e = self.engine
        if e.val_sampler is None:
            return None
        metrics = e.evaluate()
        row = {"step": e.step, "split": "val", "loss": metrics["loss"], "ppl": metrics["ppl"],
               "tokens": e.tokens_seen, "train_seconds": self.train_seconds}
        if metrics.get("bpb") is not None:
            row["bpb"] = metrics["bpb"]
        self.console.print(val_line(e.step, metrics["loss"], metrics.get("bpb")))
        self._log(row)
        e.last_val = {"step": e.step, **metrics}
        e.plugins.call("eval_end", engine=e, row=row)
        if metrics["loss"] < e.best_val_loss:
            e.best_val_loss = metrics["loss"]
            e.best_val_bpb = metrics.get("bpb")
            self._save("best")
        return metrics["loss"]

    def _save(self, tag) -> str | None:
        """Write the checkpoint ``tag``; None (and a console line) when the weights are not
        finite: a NaN checkpoint would only replace a good one."""
        e = self.engine
        path = checkpoint_path(e.output_dir, e.model_name, tag)
        if not e.weights_finite():
            self.console.print(f"Not saving {path.name}: the weights hold NaN or Inf.")
            return None
        e.tracker_state = self._tracker_state()
        e.save(path)
        if tag != "best":
            self.last_good = str(path)
        e.plugins.call("checkpoint_saved", engine=e, path=str(path))
        return str(path)

    def _last_good_text(self) -> str:
        if self.last_good:
            return (f"The weights are not finite (NaN/Inf), so no checkpoint was written; the last good checkpoint"
                    f" is {self.last_good}")
        return "The weights are not finite (NaN/Inf), so no checkpoint was written; this run saved none before"
