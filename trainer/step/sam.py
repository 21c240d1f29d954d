"""Stage 2, a gradient transform: sharpness-aware minimization (SAM, and adaptive SAM)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from trainer.numerics import square_sum
from trainer.step.accumulation import Gradients
from trainer.step.stage import Stage, StepState

# ASAM's offset in T = |w| + η, as the official code's default (SamsungLabs/ASAM, `eta=0.01`):
# a weight at 0 is still perturbed.
ASAM_ETA = 0.01


class SharpnessAware(Stage):
    """The gradients replaced by those at the weights moved uphill by ε (SAM, Foret et al.
    2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization"; ASAM,
    Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks").

    One optimizer step, given the gradients g at the weights w from `Gradients` (the full
    loss: data loss, penalty terms and Keras regularizer losses, summed over the
    `accumulate_steps` micro-batches):

    1. ε = ρ·g/‖g‖ (SAM), or with `adaptive` ε = ρ·T²g/‖T g‖ where T = |w| + η element-wise
       and η = 0.01 (ASAM, Eq. 9 of the paper with the offset of the official code; T is
       applied to every trainable variable, biases included, where the official PyTorch code
       leaves parameters not named `weight` at T = 1). ‖·‖ is the norm of the whole gradient,
       over all variables; with ‖g‖ = 0, ε = 0.
    2. The weights are moved to w + ε, the gradients are taken again there by the same
       `Gradients` stage (a second accumulated pass when `accumulate_steps` > 1), and the
       weights are restored to the saved w, bit for bit.
    3. The second gradients go on to clipping, decoupled decay and the optimizer's update.
       The step's reported losses are the first pass's, at w.

    Under a `tf.distribute` strategy g is all-reduced (summed over replicas: each replica's
    gradient is its share of the global mean) before ε is computed, so every replica moves
    its copy of the weights by the same ε and N replicas take the step one device would. The
    weights are moved and restored in cross-replica context (`merge_call`), per replica's
    copy. Under a `LossScaleOptimizer` ε is computed from the unscaled gradient; a
    non-finite first gradient makes every second gradient NaN, so the optimizer skips the
    step (and lowers its scale) with the weights restored to w.

    The step costs two gradient passes (forward and backward) instead of one.

    Args:
      gradients: the chain's `Gradients` stage, run again at w + ε.
      rho: ρ, the radius of the perturbation, > 0.
      adaptive: ASAM's element-wise scaled perturbation instead of SAM's.
    """

    phase = "gradients"

    def __init__(self, gradients: Gradients, rho: float, adaptive: bool = False):
        self.gradients = gradients
        self.rho = rho
        self.adaptive = adaptive

    def describe(self) -> str:
        return f"{'asam' if self.adaptive else 'sam'}_rho={self.rho:g}"

    def __call__(self, state: StepState) -> None:
        present = [
            (v, g) for v, g in zip(self.gradients.variables, state.gradients, strict=True)
            if g is not None
        ]  # fmt: skip
        variables = [v for v, _ in present]
        epsilons, norm = self._perturbation(variables, [g for _, g in present])
        saved = [tf.identity(v.value) for v in variables]
        replica = tf.distribute.get_replica_context()
        replica.merge_call(_updater(variables, "assign_add"), args=(epsilons,))
        second, _ = self.gradients.compute(state.batch)
        replica.merge_call(_updater(variables, "assign"), args=(saved,))
        # NaN where ‖g‖ is not finite, so a LossScaleOptimizer skips the step.
        nonfinite = norm - norm
        state.gradients = [None if g is None else g + tf.cast(nonfinite, g.dtype) for g in second]

    def _perturbation(
        self, variables: list[Any], gradients: list[tf.Tensor]
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """ε for each variable, from the replicas' summed, unscaled gradients; and ‖g‖ (‖T g‖)."""
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            gradients = replica.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        gradients = [tf.cast(g, tf.float32) for g in gradients]
        if self.gradients.loss_scaled:
            scale = tf.cast(self.gradients.optimizer.dynamic_scale, tf.float32)
            gradients = [g / scale for g in gradients]
        if self.adaptive:
            scales = [tf.abs(tf.cast(v.value, tf.float32)) + ASAM_ETA for v in variables]
            gradients = [t * g for t, g in zip(scales, gradients, strict=True)]
        norm = tf.sqrt(tf.add_n([square_sum(g) for g in gradients]))
        step = tf.math.divide_no_nan(tf.constant(self.rho, tf.float32), norm)
        if self.adaptive:
            gradients = [t * g for t, g in zip(scales, gradients, strict=True)]
        epsilons = [tf.cast(g * step, v.dtype) for v, g in zip(variables, gradients, strict=True)]
        return epsilons, norm


def _updater(variables: list[Any], method: str) -> Any:
    """A `merge_call` function: `variable.<method>(value)` on each replica's copy of each
    variable, with that replica's value."""

    def update(strategy: tf.distribute.Strategy, values: list[Any]) -> None:
        for variable, value in zip(variables, values, strict=True):
            strategy.extended.update(
                variable.value, lambda v, x: getattr(v, method)(x), args=(value,), group=False
            )

    return update
