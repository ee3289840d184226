"""Curvature schedulers: kappa(t), the global scale of every layer's learned curvature.

A layer's curvature is c = kappa(t) * exp(rho), clamped by the model (MODEL.md). Schedulers
are pure functions of the optimizer step, so resuming only needs the step; ``state_dict()``
records the schedule's settings so that resuming with a different schedule is an error
instead of a silent jump in curvature.

- ``constant``: kappa(t) = curvature
- ``linear``:   kappa(t) = min + (target - min) * f,                  f = min(t / warmup, 1)
- ``cosine``:   kappa(t) = min + (target - min) * (1 - cos(pi * f)) / 2
  (warmup_steps = 0 means target from step 0.)

Factories are called as ``factory(config, *, max_steps, **context)``.
"""

from __future__ import annotations

import math

import attrs

from phase7fw.errors import CheckpointError, Phase7Error
from phase7fw.hookspecs import hookimpl
from phase7fw.interfaces import CurvatureScheduler
from phase7fw.recipe.options import non_negative, option, positive


@attrs.frozen
class ConstantCurvatureConfig:
    curvature: float = option(1.0, check=positive, help="kappa at every step")


@attrs.frozen
class WarmupCurvatureConfig:
    warmup_steps: int = option(1000, check=non_negative, help="steps from min_curvature to target_curvature")
    target_curvature: float = option(1.0, check=positive, help="kappa after warm-up")
    min_curvature: float = option(0.1, check=positive, help="kappa at step 0 (<= target_curvature)")

    def __attrs_post_init__(self):
        if self.min_curvature > self.target_curvature:
            raise Phase7Error(
                f"curvature_scheduler: min_curvature ({self.min_curvature}) must be <="
                f" target_curvature ({self.target_curvature})"
            )


class _Scheduler(CurvatureScheduler):
    name = ""

    def settings(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"name": self.name, **self.settings()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diffs = [
            f"{key}: checkpoint {state.get(key)!r}, recipe {value!r}"
            for key, value in mine.items()
            if state.get(key) != value
        ]
        if diffs:
            raise CheckpointError(
                "curvature_scheduler in the checkpoint differs from the recipe (" + "; ".join(diffs) + ")"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


class ConstantCurvature(_Scheduler):
    name = "constant"

    def __init__(self, curvature: float = 1.0):
        self.curvature = float(curvature)

    def settings(self) -> dict:
        return {"curvature": self.curvature}

    def value(self, step: int) -> float:
        return self.curvature


class _WarmupCurvature(_Scheduler):
    def __init__(self, warmup_steps: int = 1000, target_curvature: float = 1.0, min_curvature: float = 0.1):
        if min_curvature > target_curvature:
            raise Phase7Error(
                f"curvature_scheduler {self.name}: min_curvature ({min_curvature}) must be <="
                f" target_curvature ({target_curvature})"
            )
        self.warmup_steps = int(warmup_steps)
        self.target_curvature = float(target_curvature)
        self.min_curvature = float(min_curvature)

    def settings(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps,
            "target_curvature": self.target_curvature,
            "min_curvature": self.min_curvature,
        }

    def progress(self, step: int) -> float:
        """Warm-up fraction f in [0, 1]."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(max(step, 0) / self.warmup_steps, 1.0)

    def shape(self, f: float) -> float:
        raise NotImplementedError

    def value(self, step: int) -> float:
        return self.min_curvature + (self.target_curvature - self.min_curvature) * self.shape(self.progress(step))


class LinearCurvature(_WarmupCurvature):
    name = "linear"

    def shape(self, f: float) -> float:
        return f


class CosineCurvature(_WarmupCurvature):
    name = "cosine"

    def shape(self, f: float) -> float:
        return (1.0 - math.cos(math.pi * f)) / 2.0


def build_constant(config: ConstantCurvatureConfig, *, max_steps: int, **context) -> ConstantCurvature:
    return ConstantCurvature(config.curvature)


def build_linear(config: WarmupCurvatureConfig, *, max_steps: int, **context) -> LinearCurvature:
    return LinearCurvature(config.warmup_steps, config.target_curvature, config.min_curvature)


def build_cosine(config: WarmupCurvatureConfig, *, max_steps: int, **context) -> CosineCurvature:
    return CosineCurvature(config.warmup_steps, config.target_curvature, config.min_curvature)


@hookimpl
def register_components(register):
    register("curvature_scheduler", "constant", build_constant, ConstantCurvatureConfig,
             description="kappa(t) = curvature; context: max_steps")
    register("curvature_scheduler", "linear", build_linear, WarmupCurvatureConfig,
             description="linear warm-up from min_curvature to target_curvature; context: max_steps")
    register("curvature_scheduler", "cosine", build_cosine, WarmupCurvatureConfig,
             description="cosine warm-up from min_curvature to target_curvature; context: max_steps")
