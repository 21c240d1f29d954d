"""A user's task module for `--import=runs_plugin`: the synthetic task with hooks that append
one JSON line per call to the file named by the environment variable `RUNS_HOOK_LOG`."""

from __future__ import annotations

import json
import os
from typing import Any

from tasks.synthetic import SyntheticRegression
from trainer import register_task


def _log(**record: Any) -> None:
    with open(os.environ["RUNS_HOOK_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")


@register_task("hooked_synthetic")
class HookedSynthetic(SyntheticRegression):
    """`synthetic`, recording every loop end, evaluation and the end of training."""

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        _log(hook="loop", step=step, loss=logs["loss"])

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        _log(hook="evaluate", step=step, loss=metrics["loss"])

    def on_train_end(self, result: Any) -> None:
        _log(hook="train_end", step=result.step)
