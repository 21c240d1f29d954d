"""The SavedModel export: serves data as stored (through the task's `preprocess`) and as the
model takes it."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import keras
import tensorflow as tf

# The default signature takes a batch as stored (the task's `stored_spec` features) and runs
# `preprocess`, then the model; the second takes the model's own inputs (Keras' `serve`).
STORED_DATA = "serving_default"
MODEL_INPUTS = "serve"


def export_saved_model(trainer: Any, export_dir: str) -> None:
    """Writes `trainer.model`, with the weights it holds now, as a SavedModel in `export_dir`.

    Two signatures (and endpoints of the same names on the loaded object), both in inference
    mode with float outputs in float32 (mixed precision included):
      - `serving_default`: a batch of features as stored (`trainer.stored_spec()`, e.g. uint8
        images), through `trainer.preprocess`, then the model: what `evaluate()` computes.
        `preprocess` is called with zero labels shaped by the label spec: it must not need
        real labels to transform the features.
      - `serve`: the model's own inputs (`preprocess`'s features), as Keras' `model.export`.

    The callers choose the weights (`trainer.evaluated_weights()`, or the best kept). A local
    export is written to a temporary sibling folder, then renamed over `export_dir` (an
    interrupted export leaves the previous one, or none, never a partial one); a URL
    (`gs://`, `ram://`) is written in place.

    Args:
      trainer: a built `Trainer` (its `model`, `preprocess` and `stored_spec`).
      export_dir: the SavedModel's folder; an existing export there is replaced.

    Raises:
      tf.errors.OpError, OSError: the SavedModel could not be written.
    """
    model = trainer.model
    features_spec, labels_spec = trainer.stored_spec()

    def model_inputs(features: Any) -> Any:
        batch = tf.shape(tf.nest.flatten(features)[0])[:1]
        labels = tf.nest.map_structure(
            lambda s: tf.zeros(tf.concat([batch, s.shape[1:]], 0), s.dtype), labels_spec
        )
        return trainer.preprocess(features, labels)[0]

    def serve(inputs: Any) -> Any:
        return _float32(model(inputs, training=False))

    def serve_stored(features: Any) -> Any:
        return serve(model_inputs(features))

    traced = tf.function(model_inputs, autograph=False).get_concrete_function(features_spec)
    inputs_spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(STORED_DATA, serve_stored, input_signature=[features_spec])
    archive.add_endpoint(MODEL_INPUTS, serve, input_signature=[inputs_spec])
    if "://" in export_dir:
        archive.write_out(export_dir, verbose=False)
        return
    _write_atomically(archive, export_dir)


def _write_atomically(archive: keras.export.ExportArchive, export_dir: str) -> None:
    """`archive` written to a temporary sibling of `export_dir`, then renamed over it."""
    target = os.path.abspath(export_dir)
    parent, name = os.path.split(target)
    for leftover in os.listdir(parent) if os.path.isdir(parent) else []:
        if leftover.startswith(f"{name}.tmp-") or leftover.startswith(f"{name}.old-"):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)  # killed exports
    token = uuid.uuid4().hex
    temporary, old = f"{target}.tmp-{token}", f"{target}.old-{token}"
    try:
        archive.write_out(temporary, verbose=False)
        if os.path.lexists(target):
            os.rename(target, old)
        try:
            os.rename(temporary, target)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, target)  # the previous export stays
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _float32(outputs: Any) -> Any:
    """Float outputs in float32, as training's loss and `evaluate()` see them."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs
    )
