"""Strength schedules: a penalty strength that follows a curve over the optimizer's steps.

A schedule is a multiplier curve `m(step)` on the strength's base value (the value the penalty
was given, or later assigned, e.g. by a sweep): the strength in force at a step is
`base · m(step)`. The curves are those of the learning rate's `optimizers.WarmupSchedule`, so
that one convention holds for both: the step is the optimizer's `iterations` (0 at the first
update; a resumed run continues from the checkpointed step), a warmup rises linearly from 0 over
`warmup` steps, then the decay runs from the base to `end` at step `steps`.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any

import tensorflow as tf

from trainer.errors import ConfigError

KINDS = ("constant", "linear", "cosine", "warmup")
# A schedule spec is short; bounded before `ast` parses it (see `registry.MAX_SPEC_LENGTH`).
MAX_SCHEDULE_LENGTH = 200


@dataclasses.dataclass(frozen=True)
class StrengthSchedule:
    """How a `Strength` moves over the optimizer steps: a multiplier on its base value.

    With `s = max(step − start_step, 0)`, `W = warmup` and `D = max(steps − W, 1)`:

    - during the warmup (`s < W`): `m = s / W`, from 0 to the base;
    - then `constant`: `m = 1`; `linear`: `m = (1 − r)(1 − f) + r`; `cosine`:
      `m = (1 − r) cos²(π f / 2) + r` (Keras' `CosineDecay`, written as cos² so that values
      near 0 keep their precision), with `f = min(s − W, D) / D` and `r = end / value`, the
      ratio of `end` to the value the penalty was given.

    `end` is absolute for the value given with the schedule (`l2(1e-4,
    schedule='cosine(end=1e-5)')` ends at 1e-5); a later assignment of the strength (a sweep,
    `penalty.scale = x`) sets the base and the whole curve scales with it, keeping `end`'s
    ratio (a sweep value of 1e-3 ends at 1e-4; 0 gives 0 throughout).

    Specs (`parse`): `constant()`, `linear(end=0.0, steps=None, warmup=0, start_step=0)`,
    `cosine(...)` with the same arguments, and `warmup(steps=N)`, linear from 0 over N
    steps then constant (the same as `constant(warmup=N)`).

    Attributes:
      kind: `constant`, `linear` or `cosine` (`warmup` specs become `constant`).
      end: the value at step `steps` (linear, cosine), ≥ 0; 0.0 by default.
      steps: the step (counted from `start_step`, the warmup included) at which `end` is
        reached, > 0; None for the run's `train_steps`.
      warmup: steps of linear warmup from 0, ≥ 0.
      start_step: the optimizer step at which the schedule's step 0 falls, ≥ 0; before it,
        the value at its step 0.
    """

    kind: str = "constant"
    end: float | None = None
    steps: int | None = None
    warmup: int = 0
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ConfigError(
                f"`kind` ({self.kind!r}) must be constant, linear or cosine "
                "(a warmup is constant with `warmup`)."
            )
        if self.kind == "constant" and (self.end is not None or self.steps is not None):
            raise ConfigError(
                f"A constant schedule takes no `end` or `steps` (end={self.end!r}, "
                f"steps={self.steps!r}); use linear(...) or cosine(...) to decay."
            )
        end = 0.0 if self.end is None and self.kind != "constant" else self.end
        if end is not None:
            if isinstance(end, bool) or not isinstance(end, (int, float)):
                raise ConfigError(f"`end` ({end!r}) must be a non-negative number.")
            if not (math.isfinite(end) and end >= 0):
                raise ConfigError(f"`end` ({end!r}) must be a finite number ≥ 0.")
            object.__setattr__(self, "end", float(end))
        if self.steps is not None:
            _check_int("steps", self.steps, minimum=1)
        _check_int("warmup", self.warmup, minimum=0)
        _check_int("start_step", self.start_step, minimum=0)
        if self.steps is not None and self.warmup >= self.steps and self.kind != "constant":
            raise ConfigError(
                f"`warmup` ({self.warmup}) must be below `steps` ({self.steps}): the decay "
                "runs after the warmup."
            )

    @classmethod
    def parse(cls, spec: str) -> StrengthSchedule:
        """A schedule from its spec, e.g. `"cosine(end=1e-5, warmup=100)"`, without `eval`.

        Raises:
          ConfigError: naming the spec: not a call of a known kind with literal keyword
            arguments, or an argument the kind does not take or rejects.
        """
        if not isinstance(spec, str) or len(spec) > MAX_SCHEDULE_LENGTH:
            raise ConfigError(
                f"`schedule` ({spec!r}) must be a spec of at most {MAX_SCHEDULE_LENGTH} "
                "characters like 'cosine(end=1e-5)'."
            )
        try:
            node = ast.parse(spec.strip(), mode="eval").body
        except SyntaxError:
            node = None
        if isinstance(node, ast.Name):
            node = ast.Call(func=node, args=[], keywords=[])
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and not node.args
            and all(kw.arg for kw in node.keywords)
        ):
            raise ConfigError(
                f"`schedule` ({spec!r}) must be a call with keyword arguments like "
                f"'cosine(end=1e-5)' or 'warmup(steps=100)'; kinds: {', '.join(KINDS)}."
            )
        kind = node.func.id
        if kind not in KINDS:
            raise ConfigError(
                f"`schedule` ({spec!r}): unknown kind {kind!r}; kinds: {', '.join(KINDS)}."
            )
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ConfigError(
                f"`schedule` ({spec!r}): the arguments must be literal numbers."
            ) from None
        allowed = {
            "constant": ("warmup", "start_step"),
            "warmup": ("steps", "start_step"),
        }.get(kind, ("end", "steps", "warmup", "start_step"))
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(
                f"`schedule` ({spec!r}): {kind} takes {', '.join(allowed)}, not "
                f"{', '.join(unknown)}."
            )
        if kind == "warmup":
            if "steps" not in kwargs:
                raise ConfigError(f"`schedule` ({spec!r}): warmup needs `steps`, e.g. steps=100.")
            _check_int("steps", kwargs["steps"], minimum=1, spec=spec)
            kind, kwargs = "constant", {"warmup": kwargs.pop("steps"), **kwargs}
        try:
            return cls(kind, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"`schedule` ({spec!r}): {e}") from None

    def spec(self) -> str:
        """The spec that `parse` reads back as this schedule (defaults left out)."""
        if self.kind == "constant" and self.warmup and not self.start_step:
            return f"warmup(steps={self.warmup})"
        fields = (("end", 0.0), ("steps", None), ("warmup", 0), ("start_step", 0))
        args = [
            f"{name}={getattr(self, name)!r}"
            for name, default in fields
            if getattr(self, name) is not None and getattr(self, name) != default
        ]
        return f"{self.kind}({', '.join(args)})"

    def __repr__(self) -> str:
        return f"StrengthSchedule({self.spec()!r})"

    def ratio(self, value: float, owner: str) -> float:
        """`end / value`, the ratio that `end` keeps when the base changes; 0 without `end`.

        Raises:
          ConfigError: naming `owner`: `end` ≠ 0 while `value` is 0 (no ratio to keep).
        """
        if not self.end:
            return 0.0
        if value == 0:
            raise ConfigError(
                f"{owner}: schedule {self.spec()!r} ends at {self.end:g} but starts at 0; "
                "a schedule scales its start value, so give a start value > 0."
            )
        return self.end / value

    def multiplier(self, step: Any, ratio: float, default_steps: int) -> tf.Tensor:
        """`m(step)`, a float32 scalar tensor, for the optimizer step `step` (an integer tensor).

        Args:
          step: the optimizer's `iterations` before the update it applies to.
          ratio: `end / value` (see `ratio`).
          default_steps: `steps` when it is None (the run's `train_steps`).
        """
        s = tf.maximum(tf.cast(step, tf.float32) - float(self.start_step), 0.0)
        warmup = float(self.warmup)
        decay_steps = float(max((self.steps or default_steps) - self.warmup, 1))
        fraction = (tf.minimum(s, warmup + decay_steps) - warmup) / decay_steps
        if self.kind == "cosine":
            decayed = (1.0 - ratio) * tf.square(tf.cos(0.5 * math.pi * fraction)) + ratio
        elif self.kind == "linear":
            decayed = (1.0 - ratio) * (1.0 - fraction) + ratio
        else:
            decayed = tf.constant(1.0)
        if not self.warmup:
            return decayed
        return tf.where(s < warmup, s / warmup, decayed)


def as_schedule(value: Any) -> StrengthSchedule:
    """`value` as a `StrengthSchedule`: one already, or a spec string (`StrengthSchedule.parse`).

    Raises:
      ConfigError: `value` is neither, or a spec `parse` refuses.
    """
    if isinstance(value, StrengthSchedule):
        return value
    if isinstance(value, str):
        return StrengthSchedule.parse(value)
    raise ConfigError(
        f"`schedule` ({value!r}) must be a spec like 'cosine(end=1e-5)' or a StrengthSchedule."
    )


def _check_int(argument: str, value: Any, *, minimum: int, spec: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        where = f"`schedule` ({spec!r}): " if spec else ""
        raise ConfigError(f"{where}`{argument}` ({value!r}) must be an integer ≥ {minimum}.")
