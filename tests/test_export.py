"""The SavedModel export serves what was trained: data as stored through `preprocess`, and the
model's own inputs; final, EMA and best exports, loaded in a fresh process."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks.cifar10 import Cifar10
from tasks.mnist import Mnist
from tasks.synthetic import SyntheticRegression, make_data
from trainer import TrainerOptions, export_saved_model

tfds.disable_progress_bar()

RTOL = 1e-6
ATOL = 1e-6  # logits near 0: one float32 ulp of a sum of order 1 is ~1e-7

# Loads each export in a fresh process: `serving_default` on the raw stored examples and
# `serve` on the preprocessed ones, through the signatures as a serving client calls them.
LOAD = """
import json, sys
import numpy as np
import tensorflow as tf
out = {}
for name, (export_dir, stored, inputs) in json.loads(sys.argv[1]).items():
    loaded = tf.saved_model.load(export_dir)
    default, serve = loaded.signatures["serving_default"], loaded.signatures["serve"]
    (spec,) = default.structured_input_signature[1].values()
    (key,) = default.structured_input_signature[1]
    (model_key,) = serve.structured_input_signature[1]
    out[name] = {
        "default": list(default(**{key: tf.constant(np.load(stored))}).values())[0].numpy(),
        "serve": list(serve(**{model_key: tf.constant(np.load(inputs))}).values())[0].numpy(),
        "spec": json.dumps([spec.dtype.name, spec.shape.as_list()]),
    }
np.savez(sys.argv[2], **{f"{n}/{k}": np.asarray(v[k]) for n, v in out.items() for k in v})
"""


def first_batch(dataset):
    """The first `(features, labels)` batch of `dataset`, as stored, in NumPy."""
    features, labels = next(iter(dataset))
    return features.numpy(), labels.numpy()


class ExportTest(tf.test.TestCase):
    """Trains mnist (final export), cifar10 (EMA export) and synthetic (keep_best's export)
    a few steps each, then loads the three exports in one fresh process."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="export_test_")
        cls.addClassCleanup(shutil.rmtree, cls.root, ignore_errors=True)
        stack = contextlib.ExitStack()
        cls.addClassCleanup(stack.close)
        stack.enter_context(tfds.testing.mock_data(num_examples=32))
        common = {"batch_size": 16, "steps_per_loop": 4, "jit_compile": False}
        cls.tasks = {
            "mnist": Mnist(TrainerOptions(train_steps=8, **common, **cls._dirs("mnist"))),
            "cifar10": Cifar10(
                TrainerOptions(train_steps=4, ema_decay=0.5, **common, **cls._dirs("cifar10"))
            ),
            "synthetic": SyntheticRegression(
                TrainerOptions(
                    train_steps=12,
                    eval_every=4,
                    keep_best=True,
                    learning_rate=0.03,
                    model_dir=os.path.join(cls.root, "synthetic_run"),
                    **common,
                    **cls._dirs("synthetic"),
                )
            ),
        }
        cls.results, cls.references, args = {}, {}, {}
        for name, task in cls.tasks.items():
            cls.results[name] = task.train()
            stored, labels = first_batch(task.eval_dataset())
            inputs = task.preprocess(tf.constant(stored), tf.constant(labels))[0].numpy()
            with task.evaluated_weights():  # evaluate()'s path: preprocess, then the model
                evaluated = task.model(inputs, training=False).numpy()
            cls.references[name] = (stored, inputs, evaluated, task.model(inputs).numpy())
            paths = [os.path.join(cls.root, f"{name}_{k}.npy") for k in ("stored", "inputs")]
            np.save(paths[0], stored)
            np.save(paths[1], inputs)
            args[name] = [task.options.export_dir, *paths]
        # The synthetic task's whole held-out set, to recompute the best evaluation's loss.
        eval_x = np.concatenate(
            [x for x, _ in cls.tasks["synthetic"].eval_dataset().as_numpy_iterator()]
        )
        np.save(os.path.join(cls.root, "eval_x.npy"), eval_x)
        args["synthetic_all"] = [args["synthetic"][0], *[os.path.join(cls.root, "eval_x.npy")] * 2]
        output = os.path.join(cls.root, "loaded.npz")
        subprocess.run(
            [sys.executable, "-c", LOAD, json.dumps(args), output], check=True, timeout=120
        )
        with np.load(output) as loaded:
            cls.loaded = dict(loaded)

    @classmethod
    def _dirs(cls, name):
        return {"export_dir": os.path.join(cls.root, f"{name}_export")}

    def assert_serves(self, name):
        evaluated = self.references[name][2]
        self.assertAllClose(self.loaded[f"{name}/default"], evaluated, rtol=RTOL, atol=ATOL)
        self.assertAllClose(self.loaded[f"{name}/serve"], evaluated, rtol=RTOL, atol=ATOL)

    def test_mnist_default_signature_takes_uint8_images_as_stored(self):
        """The default signature's input is the stored uint8 `[None, 28, 28, 1]`; on raw
        examples it gives the model's outputs on `preprocess`ed ones (evaluate()'s path)."""
        dtype, shape = json.loads(str(self.loaded["mnist/spec"]))
        self.assertEqual((dtype, shape), ("uint8", [None, 28, 28, 1]))
        self.assertEqual(self.references["mnist"][0].dtype, np.uint8)
        self.assert_serves("mnist")

    def test_cifar10_ema_export_serves_the_average_from_uint8_images(self):
        """With `ema_decay` both signatures serve the EMA (evaluate()'s weights), not the
        trained ones; the default takes uint8 `[None, 32, 32, 3]`."""
        dtype, shape = json.loads(str(self.loaded["cifar10/spec"]))
        self.assertEqual((dtype, shape), ("uint8", [None, 32, 32, 3]))
        self.assert_serves("cifar10")
        _, _, evaluated, trained = self.references["cifar10"]
        self.assertGreater(np.abs(trained - evaluated).max(), 1e-4)  # the EMA is not the raw

    def test_synthetic_best_export_serves_the_best_evaluation(self):
        """keep_best's export: the held-out MSE of its default signature's predictions,
        computed in NumPy, is the best evaluation's loss (not the last one's)."""
        result = self.results["synthetic"]
        losses = {h["step"]: h["loss"] for h in result.history}
        best_step = min(losses, key=losses.get)
        self.assertNotEqual(best_step, max(losses), losses)  # the best is not the final
        _, _, _, eval_y = make_data()
        for signature in ("default", "serve"):  # float32 [None, 64]: both take the same
            predictions = self.loaded[f"synthetic_all/{signature}"].astype(np.float64)
            mse = np.mean(np.square(eval_y - predictions))
            self.assertAllClose(mse, losses[best_step], rtol=RTOL)

    def test_export_replaces_an_existing_one_and_removes_leftovers(self):
        """Exporting over an export replaces it whole (a stale file goes), and a killed
        export's temporary sibling is removed; the written export loads."""
        task = self.tasks["synthetic"]
        export_dir = os.path.join(self.root, "again")
        os.makedirs(os.path.join(export_dir, "stale"))
        os.makedirs(f"{export_dir}.tmp-killed")
        with task.evaluated_weights():
            export_saved_model(task, export_dir)
        self.assertFalse(os.path.exists(os.path.join(export_dir, "stale")))
        self.assertFalse(os.path.exists(f"{export_dir}.tmp-killed"))
        self.assertEqual([n for n in os.listdir(self.root) if n.startswith("again")], ["again"])
        self.assertTrue(os.path.exists(os.path.join(export_dir, "saved_model.pb")))


if __name__ == "__main__":
    tf.test.main()
