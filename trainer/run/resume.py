"""Resuming: what a run was configured with, and what the command given now changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.errors import ConfigError
from trainer.optimizers import inner, learning_rate_setting
from trainer.options import recorded_options
from trainer.run.protocol import Runnable

# Options recorded with a run (`recorded` in their metadata); a new value on resume is in force,
# and logged.
_RECORDED_OPTIONS = recorded_options()


def settings(trainer: Runnable) -> dict[str, Any]:
    """What a resumed run is compared on: the optimizer's class and learning rate (or its
    schedule), the recorded options, each penalty's parameters by name, and the parameter
    groups (`lr_multiplier`, `freeze`) as written."""
    return {
        "optimizer": type(inner(trainer.optimizer)).__name__,
        "learning_rate": learning_rate_setting(trainer.optimizer),
        **{name: getattr(trainer.options, name) for name in _RECORDED_OPTIONS},
        "penalties": {p.name: _penalty(p) for p in trainer.penalties},
        "param_groups": [repr(g) for g in getattr(trainer, "param_groups", ())],
    }


def _penalty(penalty: Any) -> dict[str, Any]:
    """A penalty's class, parameters (floats as typed, without float32 noise) and string
    selectors, as JSON values."""
    params = {
        k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in penalty.params().items()
    }
    selectors = {
        k: getattr(penalty, k)
        for k in ("include", "exclude")
        if isinstance(getattr(penalty, k), str)
    }
    return {"class": type(penalty).__name__, **params, **selectors}


def changes(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """One line per difference between the checkpointed run's settings and these.

    Raises:
      ConfigError: a difference that cannot be honoured: another optimizer class, whose
        state (moments, accumulators) the checkpoint holds in another form.
    """
    if not saved:
        return []
    if saved.get("optimizer") != now["optimizer"]:
        raise ConfigError(
            f"The checkpointed run used optimizer {saved.get('optimizer')}, this one "
            f"{now['optimizer']}: its optimizer state cannot be carried over; resume with the "
            "same optimizer, or use another --model_dir."
        )
    lines = [
        f"{key}: {saved[key]} in the checkpointed run -> {now[key]} now"
        for key in ("learning_rate", *_RECORDED_OPTIONS, "param_groups")
        if key in saved and saved[key] != now[key]
    ]
    before, after = saved.get("penalties", {}), now["penalties"]
    for name in sorted(set(before) | set(after)):
        if name not in after:
            lines.append(f"penalty {name} removed (it was {_describe(before[name])})")
        elif name not in before:
            lines.append(f"penalty {name} added: {_describe(after[name])}")
        else:
            for key in sorted(set(before[name]) | set(after[name])):
                old, new = before[name].get(key), after[name].get(key)
                if old != new:
                    lines.append(f"{name}.{key}: {old} in the checkpointed run -> {new} now")
    return lines


def _describe(params: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in params.items() if k != "class")
    return f"{params.get('class', '?')}({args})"
