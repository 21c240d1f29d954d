"""Parameter groups: per-group learning-rate multipliers (`LrMultiplier`, `LayerwiseLrDecay`)
and freezing (`Freeze`).

A parameter group changes how far the optimizer's step moves the variables it selects; it is
not a penalty (it adds no loss, decays nothing). Two stages carry it out on the open step:
`GroupSnapshot` reads the selected weights before the pre-update phase (decoupled weight
decay), `GroupScaling` rescales their move right after `apply_gradients`, before the
projections and the EMA:

    w ← w_before + m · (w_after − w_before)        (`LrMultiplier(m)`)
    w ← w_before                                    (`Freeze`, bit for bit)

Scaling the *update*, not the gradient, is what makes `m` a learning-rate multiplier for
every optimizer: Adam and RMSprop normalise the gradient, so a scaled gradient would change
(almost) nothing, while their update is linear in the learning rate (Keras' SGD with or
without momentum, RMSprop, Adam and AdamW all compute `Δ = lr · f(gradients, state)`, the
momentum buffers of SGD and RMSprop holding lr-scaled terms that scale along). Because the
snapshot precedes `PenaltyUpdates`, the decoupled decay `lr·rate·w` is scaled too: the group
decays by `m·lr·rate`, as it would with its own learning rate `m·lr` (Keras' `AdamW`'s own
`weight_decay`, applied inside `apply_gradients`, is lr-coupled and scales the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import tensorflow as tf

from trainer.cli.registry import register_param_group
from trainer.errors import ConfigError, check_float32, check_positive
from trainer.penalties import selection
from trainer.penalties.coverage import Coverage
from trainer.penalties.selection import Selector, variable_path
from trainer.step.stage import Stage, StepState


class ParamGroup:
    """Base class of parameter groups: a selection of trainable variables whose optimizer
    update is rescaled by `multiplier` (0 for frozen) after `apply_gradients`; a subclass
    sets `multiplier`, or overrides `multipliers` for one per variable.

    Selection is a penalty's (`Penalty`): `include` and `exclude` are regexes searched in
    `variable.path`, or predicates; without `include` every trainable variable is selected;
    a regex matching no variable, or an empty selection, is an error. A variable in two
    groups is an error naming both.

    Args:
      include: regex or predicate choosing variables; None for all of them.
      exclude: regex or predicate removing variables from the selection; None for none.
    """

    registered_name: ClassVar[str | None] = None
    multiplier: float = 1.0

    def __init__(self, *, include: Selector = None, exclude: Selector = None):
        self.include = include
        self.exclude = exclude
        self._include = selection.compile_selector("include", include)
        self._exclude = selection.compile_selector("exclude", exclude)

    @property
    def label(self) -> str:
        """What the step line shows for this group (`lr×0.1`, `frozen`)."""
        return multiplier_label(self.multiplier)

    def multipliers(self, variables: Sequence[Any]) -> list[float]:
        """The multiplier of each of the selected `variables`: `multiplier` for all here."""
        return [self.multiplier] * len(variables)

    def select(self, variables: Sequence[Any]) -> list[Any]:
        """This group's variables among the trainable `variables`, in their order.

        Raises:
          ConfigError: a regex matches no variable path, or nothing is selected.
        """
        return selection.select(
            variables,
            include=self._include,
            exclude=self._exclude,
            default=lambda v: True,
            owner=repr(self),
        )

    def params(self) -> dict[str, Any]:
        """The arguments shown in `repr`, before the selectors."""
        return {}

    def __repr__(self) -> str:
        args = [repr(v) for v in self.params().values()]
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if value is not None:
                shown = getattr(value, "__name__", value) if callable(value) else value
                args.append(f"{key}={shown!r}")
        return f"{type(self).__name__}({', '.join(args)})"


@register_param_group("lr_multiplier")
class LrMultiplier(ParamGroup):
    """The selected variables train at `multiplier` times the learning rate.

    The optimizer's move of each selected variable (its update, plus the decoupled weight
    decay before it) is multiplied by `multiplier` after `apply_gradients`; this equals a
    learning rate of `multiplier·lr` for them under SGD, momentum, RMSprop, Adam and AdamW
    (updates linear in the learning rate), up to float rounding. Keras layer constraints act
    inside `apply_gradients`, on the unscaled move; tapeloop's projections (`max_norm`, ...)
    act after the scaling.

    Args:
      multiplier: m > 0 (`freeze` for 0).
      include: regex or predicate choosing variables; None for all of them.
      exclude: regex or predicate removing variables from the selection.

    Raises:
      ConfigError: `multiplier` is not a positive float32 number.
    """

    def __init__(self, multiplier: float, *, include: Selector = None, exclude: Selector = None):
        super().__init__(include=include, exclude=exclude)
        self.multiplier = check_float32("multiplier", check_positive("multiplier", multiplier))

    def params(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier}


@register_param_group("freeze")
class Freeze(ParamGroup):
    """The selected variables do not move: they are restored, bit for bit, after each update.

    Nothing moves a frozen variable: not the optimizer, not a decoupled weight decay (undone
    with the update), not a Keras constraint (inside `apply_gradients`); a projection
    penalty (`max_norm`, ...) on a frozen variable, which would act after the restore, is
    refused. Gradients are still computed and the optimizer's slots (Adam's moments) still
    follow them: to save that work, make the layer non-trainable in the model instead.

    Args:
      include: regex or predicate choosing variables; None for all of them.
      exclude: regex or predicate removing variables from the selection.
    """

    multiplier = 0.0

    @property
    def label(self) -> str:
        return "frozen"


@register_param_group("layerwise_lr_decay")
class LayerwiseLrDecay(ParamGroup):
    """Layer-wise learning-rate decay: the last layer trains at lr, each layer below it at
    `rate` times the rate of the layer above (`lr·rate^depth`, depth 0 for the last layer),
    as in ELECTRA (Clark et al. 2020) and BEiT fine-tuning.

    The layers and their order are the model's, as its trainable variables list them (Keras
    lists them layer by layer, in the order the layers were created): a variable's layer is
    its path without the last component (`net/block1/proj` for `net/block1/proj/kernel`),
    so each innermost layer counts once. Each variable's update is scaled as by
    `LrMultiplier` (see there).

    Args:
      rate: the decay per layer, in (0, 1].
      include: regex or predicate choosing variables (the layers counted); None for all.
      exclude: regex or predicate removing variables from the selection.

    Raises:
      ConfigError: `rate` is not in (0, 1], or a layer's `rate^depth` is below float32's
        smallest normal number (when resolved).
    """

    def __init__(self, rate: float, *, include: Selector = None, exclude: Selector = None):
        super().__init__(include=include, exclude=exclude)
        rate = check_positive("rate", rate)
        if rate > 1:
            raise ConfigError(f"`rate` ({rate!r}) must be in (0, 1]: the decay per layer.")
        self.rate = rate

    @property
    def label(self) -> str:
        return f"lr×{self.rate:g}^depth"

    def multipliers(self, variables: Sequence[Any]) -> list[float]:
        layers = [variable_path(v).rpartition("/")[0] for v in variables]
        order = list(dict.fromkeys(layers))
        depth = {layer: len(order) - 1 - i for i, layer in enumerate(order)}
        return [
            check_float32(f"{self!r}: rate**{depth[layer]}", self.rate ** depth[layer])
            for layer in layers
        ]

    def params(self) -> dict[str, Any]:
        return {"rate": self.rate}


def multiplier_label(multiplier: float) -> str:
    """`lr×0.1`, or `frozen` for 0: a variable's entry in the coverage table."""
    return "frozen" if multiplier == 0 else f"lr×{multiplier:g}"


def resolve_groups(
    groups: Sequence[ParamGroup],
    variables: Sequence[Any],
    selections: Sequence[tuple[Any, Sequence[Any]]] = (),
) -> list[tuple[ParamGroup, list[Any]]]:
    """Each group's selected variables among the trainable `variables`, checked.

    Args:
      groups: the parameter groups.
      variables: the trainable variables.
      selections: `(penalty, selected variables)` pairs, to refuse a projection on a frozen
        variable.

    Raises:
      ConfigError: a group selects nothing, a variable is in two
        groups, or a frozen variable is projected by a penalty.
    """
    resolved = []
    owner: dict[int, ParamGroup] = {}
    for group in groups:
        chosen = group.select(variables)
        for v in chosen:
            other = owner.setdefault(id(v), group)
            if other is not group:
                raise ConfigError(
                    f"{variable_path(v)!r} is in two parameter groups, {other!r} and "
                    f"{group!r}; exclude it from one of them."
                )
        resolved.append((group, chosen))
    frozen = {id(v) for g, vs in resolved for v, m in zip(vs, g.multipliers(vs)) if m == 0}
    for penalty, selected in selections:
        if not getattr(penalty, "has_project", False):
            continue
        for v in selected:
            group = owner.get(id(v))
            if id(v) in frozen:
                raise ConfigError(
                    f"{variable_path(v)!r} is frozen by {group!r} and projected by {penalty!r} "
                    "after the update; exclude it from one of them."
                )
    return resolved


def group_coverage(groups: Sequence[tuple[ParamGroup, Sequence[Any]]]) -> list[Coverage]:
    """The groups as coverage-table entries: `lr×0.1` or `frozen` on each selected variable,
    one entry per distinct multiplier of a group."""
    entries = []
    for group, variables in groups:
        by_label: dict[str, list[Any]] = {}
        for v, m in zip(variables, group.multipliers(variables), strict=True):
            by_label.setdefault(multiplier_label(m), []).append(v)
        entries += [
            Coverage(label, f"{group!r}, on the optimizer's update", vs)
            for label, vs in by_label.items()
        ]
    return entries


def scaled_variables(
    groups: Sequence[tuple[ParamGroup, Sequence[Any]]],
) -> list[tuple[Any, float]]:
    """`(variable, multiplier)` for every grouped variable whose multiplier is not 1."""
    pairs = [(v, m) for g, vs in groups for v, m in zip(vs, g.multipliers(vs), strict=True)]
    return [(v, m) for v, m in pairs if m != 1]


class GroupSnapshot(Stage):
    """Reads the grouped variables' values before the pre-update phase, into the `StepState`.

    Args:
      groups: `(group, selected variables)` pairs.
    """

    phase = "before_update"

    def __init__(self, groups: Sequence[tuple[ParamGroup, Sequence[Any]]]):
        self.variables = [v for v, _ in scaled_variables(groups)]

    def __call__(self, state: StepState) -> None:
        state.snapshot = [tf.identity(v.value) for v in self.variables]


class GroupScaling(Stage):
    """Rescales the grouped variables' move since `GroupSnapshot`, right after the update.

    In cross-replica context (`merge_call`), as `PenaltyUpdates`: mirrored variables get one
    identical assignment. On a step a `LossScaleOptimizer` skipped, the weights did not move
    (no decay, no update), so `w_before + m·0` leaves them bit for bit as they were.

    Args:
      groups: `(group, selected variables)` pairs, as given to `GroupSnapshot`.
    """

    phase = "update"

    def __init__(self, groups: Sequence[tuple[ParamGroup, Sequence[Any]]]):
        self.groups = [(g, list(vs)) for g, vs in groups]
        self.scaled = scaled_variables(groups)

    def describe(self) -> str:
        return ", ".join(f"{g.label} ({len(vs)} variables)" for g, vs in self.groups)

    def __call__(self, state: StepState) -> None:
        tf.distribute.get_replica_context().merge_call(self._merged, args=(state.snapshot,))

    def _merged(self, strategy: tf.distribute.Strategy, snapshot: Sequence[Any]) -> None:
        before = [strategy.experimental_local_results(s)[0] for s in snapshot]
        for (v, multiplier), w_before in zip(self.scaled, before, strict=True):
            if multiplier == 0:
                v.assign(w_before)  # bit for bit, whatever the move
            else:
                m = tf.constant(multiplier, w_before.dtype)
                v.assign(w_before + m * (v.value - w_before))
