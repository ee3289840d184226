"""Built-in callbacks (kind ``callback``).

``diagnostics``: every ``every`` steps, the model's per-layer statistics on one validation
batch (``model.diagnostics(input_ids) -> {name: float}``, an optional model method) are logged
as a row with ``"split": "diag"`` to every tracker (training_log.jsonl, W&B, TensorBoard). The
Phase 7 model reports, per layer, attention entropy and score range, q/k norms before the
exp-map and the share of rows at the tangent clamp, curvature and temperature, the mixer
gate's mean, the SSM's effective rank and decay half-life (docs/model.md, "Diagnostics").

    [[callbacks]]
    name = "diagnostics"
    every = 250
"""

from __future__ import annotations

import attrs
import torch

from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import Callback
from phase7fw.recipe.options import option, positive


@attrs.frozen
class DiagnosticsConfig:
    every: int = option(250, check=positive, help="steps between two diagnostics rows (checked at log steps)")
    batch_rows: int = option(4, check=positive, help="sequences of the first validation batch to use")


class Diagnostics(Callback):
    def __init__(self, config: DiagnosticsConfig):
        self.every, self.batch_rows = config.every, config.batch_rows
        self.next_step = config.every
        self.disabled = False

    def _why_not(self, engine) -> str | None:
        if not callable(getattr(engine.model, "diagnostics", None)):
            return f"the {engine.model_name!r} model reports no diagnostics"
        if engine.dist.strategy == "fsdp":
            return "not available under FSDP (the statistics read unsharded weights)"
        return None

    def on_run_start(self, engine) -> None:
        why = self._why_not(engine)
        if why is not None:
            self.disabled = True
            engine.console.print(f"callback diagnostics: off, {why}")
        while self.next_step <= engine.step:  # resumed run: the next multiple of `every`
            self.next_step += self.every

    def on_step_end(self, engine, row: dict) -> None:
        if self.disabled or engine.step < self.next_step:
            return
        self.next_step = (engine.step // self.every + 1) * self.every
        sampler = engine.val_sampler or engine.train_sampler
        x, _ = sampler.batch(0)  # the same batch every time: rows compare over training
        was_training = engine.model.training
        engine.model.eval()
        try:
            with torch.no_grad(), engine.autocast():
                stats = engine.model.diagnostics(x[: self.batch_rows].to(engine.device))
        finally:
            engine.model.train(was_training)
        engine.log({"step": engine.step, "split": "diag", **stats})


def build_diagnostics(config: DiagnosticsConfig, **context) -> Diagnostics:
    return Diagnostics(config)


@hookimpl
def register_components(register):
    register("callback", "diagnostics", build_diagnostics, DiagnosticsConfig,
             description="per-layer model statistics on one validation batch every N steps, logged as split 'diag'")
