"""The public API: what `trainer` exports, module docstrings, and tests that stay on its seams."""

import dataclasses
import glob
import importlib
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from array_task import ArrayTask, regression_data

import trainer
from trainer import L2, DecoupledWeightDecay, TrainerOptions

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


class PublicApiTest(tf.test.TestCase):
    def test_all_names_import(self):
        """Everything in `trainer.__all__` is importable from `trainer`, and documented."""
        for name in trainer.__all__:
            value = getattr(trainer, name)
            self.assertTrue(getattr(value, "__doc__", None), name)

    def test_every_module_has_a_docstring(self):
        """A docstring line on every module of the framework, subpackages included."""
        pattern = os.path.join(REPO_DIR, "trainer", "**", "*.py")
        paths = glob.glob(pattern, recursive=True)
        self.assertGreater(len(paths), 20)
        for path in paths:
            relative = os.path.relpath(path, REPO_DIR)[: -len(".py")].replace(os.sep, ".")
            module = importlib.import_module(relative.removesuffix(".__init__"))
            self.assertTrue(module.__doc__ and module.__doc__.strip(), path)

    def test_tests_and_benchmarks_use_no_private_trainer_attribute(self):
        """Every private name a built Trainer has (class or instance) is absent from tests/
        and benchmarks/: where a test needs one, a public seam is missing."""
        x, y = regression_data(n=32)
        task = ArrayTask(x, y, TrainerOptions(batch_size=8, train_steps=2),
                         penalties=[L2(1e-3), DecoupledWeightDecay(1e-3)])  # fmt: skip
        task.train()
        names = {n for n in dir(trainer.Trainer) if n.startswith("_") and not n.startswith("__")}
        names |= {n for n in vars(task) if n.startswith("_")}
        names -= {n for n in vars(ArrayTask) if n.startswith("_")}  # the test helper's own
        names -= {"_model_fn", "_loss_fn", "_optimizer_fn"}  # set by ArrayTask.__init__
        self.assertIn("_Trainer__built", names)  # the scan below sees real names
        sources = glob.glob(os.path.join(TESTS_DIR, "**", "*.py"), recursive=True)
        sources += glob.glob(os.path.join(REPO_DIR, "benchmarks", "**", "*.py"), recursive=True)
        pattern = re.compile(r"\.(" + "|".join(sorted(names)) + r")\b")
        for path in sources:
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    self.assertIsNone(pattern.search(line), f"{path}:{number}: {line.strip()}")

    def test_options_and_result_are_dataclasses(self):
        self.assertTrue(dataclasses.is_dataclass(TrainerOptions))
        self.assertTrue(dataclasses.is_dataclass(trainer.TrainResult))


if __name__ == "__main__":
    tf.test.main()
