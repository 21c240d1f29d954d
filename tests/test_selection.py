"""Variable selection by regex on `variable.path` or by predicate, and its errors."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from absl.testing import parameterized
from array_task import small_model

from trainer import L2, ConfigError, DecoupledWeightDecay, SelectiveL2

ALL = [
    "net/hidden/kernel",
    "net/hidden/bias",
    "net/norm/gamma",
    "net/norm/beta",
    "net/out/kernel",
    "net/out/bias",
]


class SelectionTest(parameterized.TestCase, tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.variables = small_model().trainable_variables

    def paths(self, penalty):
        return [v.path for v in penalty.select(self.variables)]

    def test_model_paths_are_what_the_tests_assume(self):
        """Keras 3 paths (`net/hidden/kernel`), not short names (`kernel`)."""
        self.assertEqual([v.path for v in self.variables], ALL)

    @parameterized.named_parameters(
        ("l2_all", L2(0.1), ALL),
        ("include", SelectiveL2(0.1, include="kernel"), ["net/hidden/kernel", "net/out/kernel"]),
        ("include_layer", SelectiveL2(0.1, include="^net/out/"),
         ["net/out/kernel", "net/out/bias"]),
        ("exclude", SelectiveL2(0.1, exclude="bias|norm"), ["net/hidden/kernel", "net/out/kernel"]),
        ("both", SelectiveL2(0.1, include="hidden|out", exclude="bias"),
         ["net/hidden/kernel", "net/out/kernel"]),
        ("predicate", SelectiveL2(0.1, include=lambda v: len(v.shape) == 1),
         ["net/hidden/bias", "net/norm/gamma", "net/norm/beta", "net/out/bias"]),
        ("exclude_predicate", L2(0.1, exclude=lambda v: "norm" in v.path),
         ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]),
        ("decay_default_ndim2", DecoupledWeightDecay(0.1), ["net/hidden/kernel", "net/out/kernel"]),
        ("decay_include", DecoupledWeightDecay(0.1, include="norm"),
         ["net/norm/gamma", "net/norm/beta"]),
    )  # fmt: skip
    def test_selects(self, penalty, expected):
        self.assertEqual(self.paths(penalty), expected)

    @parameterized.named_parameters(
        ("include_typo", SelectiveL2(0.1, include="kernal"), "include='kernal' matches no"),
        ("exclude_typo", SelectiveL2(0.1, exclude="biass"), "exclude='biass' matches no"),
        ("everything_excluded", SelectiveL2(0.1, exclude="net"), "selects no variable"),
        ("predicate_empty", SelectiveL2(0.1, include=lambda v: False), "selects no variable"),
        ("decay_on_biases_only_excluded", DecoupledWeightDecay(0.1, exclude="kernel"),
         "selects no variable"),
    )  # fmt: skip
    def test_empty_or_dead_selection_is_an_error(self, penalty, message):
        """A regex that matches nothing is a typo, not a no-op: the error lists real paths."""
        with self.assertRaises(ConfigError) as cm:
            penalty.select(self.variables)
        text = str(cm.exception)
        self.assertIn(message, text)
        self.assertIn("'net/hidden/kernel'", text)
        self.assertIn(repr(penalty), text)
        self.assertNotIn("\n", text)


if __name__ == "__main__":
    tf.test.main()
