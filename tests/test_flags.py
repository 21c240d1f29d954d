"""Options that cannot act are refused with one line naming them: float options float32 cannot
hold, `resume_from` without a `model_dir`, `export_dir` that is the `model_dir`."""

import dataclasses
import math
import os
import re

from absl.testing import absltest, parameterized
from cli_runner import CliTestCase, run_cli

from trainer import TrainerOptions
from trainer.errors import ConfigError
from trainer.options import float_options, normalised_path, same_path

# With these, 0.5 is a valid value of every float option (end_learning_rate needs a schedule and
# must not exceed learning_rate).
VALID_BASE = {"learning_rate": 1.0, "lr_schedule": "cosine"}


class FloatOptionsTest(parameterized.TestCase):
    def test_float_options_are_every_float_field(self):
        self.assertContainsSubset(
            {"learning_rate", "clip_global_norm", "ema_decay", "early_stop_min_delta",
             "end_learning_rate", "rollback_lr_factor", "in_memory_fraction"},
            float_options(),
        )  # fmt: skip
        for field in dataclasses.fields(TrainerOptions):  # by default's type, as a cross-check
            if field.default is not None:
                is_float = isinstance(field.default, float)
                self.assertEqual(field.name in float_options(), is_float, field.name)

    @parameterized.parameters(1e39, -1e39, math.inf, -math.inf, math.nan, 10**400, 1e-40)
    def test_a_value_float32_cannot_hold_is_refused_naming_the_field(self, bad):
        for name in float_options():
            with self.subTest(name=name):
                with self.assertRaisesRegex(ConfigError, re.escape(f"`{name}` ({bad!r})")):
                    TrainerOptions(**{**VALID_BASE, name: bad})

    def test_a_normal_value_is_accepted(self):
        for name in float_options():
            with self.subTest(name=name):
                self.assertEqual(getattr(TrainerOptions(**{**VALID_BASE, name: 0.5}), name), 0.5)


class DirectoriesTest(absltest.TestCase):
    def test_resume_from_without_model_dir_is_refused_naming_both(self):
        with self.assertRaisesRegex(ConfigError, r"`resume_from` \('runs/a/ckpt-30'\) needs a "
                                    "`model_dir`"):  # fmt: skip
            TrainerOptions(resume_from="runs/a/ckpt-30")
        TrainerOptions(resume_from="runs/a/ckpt-30", model_dir="runs/b")

    def test_export_dir_that_is_model_dir_however_spelt_is_refused(self):
        here = os.getcwd()
        for model_dir, export_dir in [
            ("runs/a", "runs/a"),
            ("runs/a", "runs/a/"),
            ("runs/a", "./runs//a/."),
            ("runs/a", os.path.join(here, "runs", "a")),
            ("runs/a", "runs/b/../a"),
            ("gs://bucket/runs/a", "gs://bucket/runs/a/"),
            ("gs://bucket/runs/a", "gs://bucket//runs/./a"),
        ]:
            with self.subTest(model_dir=model_dir, export_dir=export_dir):
                with self.assertRaisesRegex(
                    ConfigError, f"`export_dir` \\({export_dir!r}\\) is `model_dir` "
                    f"\\({model_dir!r}\\)"
                ):  # fmt: skip
                    TrainerOptions(model_dir=model_dir, export_dir=export_dir)

    def test_a_folder_of_its_own_is_accepted(self):
        """Inside model_dir too: the SavedModel's names (saved_model.pb, variables/, assets/,
        fingerprint.pb) are none of the run's."""
        for model_dir, export_dir in [
            ("runs/a", "runs/a/export"),
            ("runs/a", "runs/ab"),
            ("runs/a", "runs"),
            ("gs://bucket/runs/a", "gs://bucket/runs/a/export"),
            ("gs://bucket/runs/a", "runs/a"),
            ("gs://bucket/a", "gs://other/a"),
        ]:
            with self.subTest(model_dir=model_dir, export_dir=export_dir):
                TrainerOptions(model_dir=model_dir, export_dir=export_dir)

    def test_normalised_path(self):
        self.assertEqual(normalised_path("gs://b//x/./y/../z/"), "gs://b/x/z")
        self.assertEqual(normalised_path("x/"), os.path.join(os.getcwd(), "x"))
        target = self.create_tempdir("target").full_path
        link = os.path.join(self.create_tempdir("links").full_path, "link")
        os.symlink(target, link)
        self.assertTrue(same_path(os.path.join(link, "run"), os.path.join(target, "run")))


class CommandLineTest(CliTestCase):
    @parameterized.named_parameters(
        ("learning_rate", ["--learning_rate=1e39"], "`learning_rate` (1e+39) is not "
         "representable in float32"),
        ("clip_global_norm", ["--clip_global_norm=inf"], "`clip_global_norm` (inf) must be a "
         "finite number"),
        ("resume_from", ["--resume_from=/nowhere/ckpt-3"], "`resume_from` ('/nowhere/ckpt-3') "
         "needs a `model_dir`"),
        ("export_dir", ["--model_dir=/tmp/x", "--export_dir=/tmp/x/"], "`export_dir` "
         "('/tmp/x/') is `model_dir` ('/tmp/x')"),
        ("sam_rho", ["--sam_rho=-0.05"], "`sam_rho` (-0.05) must be"),
        ("sam_adaptive", ["--sam_adaptive"], "`sam_adaptive` (True) needs `sam_rho` above 0"),
        ("swa_start", ["--swa_start=5"], "`swa_start` (5) needs `swa_every` above 0"),
        ("swa_start_late", ["--swa_start=10", "--swa_every=1"], "`swa_start` (10) must be an "
         "integer from 0 to 9"),
        ("swa_with_ema", ["--swa_every=2", "--ema_decay=0.9"], "`swa_every` (2) and `ema_decay` "
         "(0.9) both average the weights"),
        ("swa_bn_batches", ["--swa_every=2", "--swa_bn_batches=0"], "`swa_bn_batches` (0) must "
         "be an integer from 1"),
    )  # fmt: skip
    def test_one_line_exit_2_before_training(self, flags, message):
        result = run_cli("--train_steps=10", *flags)
        self.assert_usage_error(result, message)
        self.assertNotIn("step 10/10", result.stderr)


if __name__ == "__main__":
    absltest.main()
