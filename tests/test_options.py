"""TrainerOptions' field metadata: help, section and "recorded for resume", read by the CLI,
the class docstring and resume."""

import dataclasses

from absl.testing import absltest

from trainer import TrainerOptions
from trainer.options import SECTIONS, option_help, option_sections, recorded_options
from trainer.run import resume

# What a resumed run compares and logs, besides the optimizer and its learning rate.
RECORDED = {
    "batch_size", "seed", "steps_per_loop", "eval_every", "checkpoint_every", "summary_every",
    "train_steps", "lr_schedule", "warmup_steps", "end_learning_rate", "clip_global_norm",
    "accumulate_steps", "ema_decay", "early_stop_patience", "mixed_precision", "sam_rho",
    "sam_adaptive", "swa_start", "swa_every", "swa_bn_batches", "label_smoothing", "mixup_alpha",
}  # fmt: skip


class MetadataTest(absltest.TestCase):
    def test_every_field_has_help_a_known_section_and_a_recorded_marker(self):
        for field in dataclasses.fields(TrainerOptions):
            with self.subTest(field=field.name):
                self.assertGreater(len(field.metadata["help"].split()), 3)
                self.assertIn(field.metadata["section"], SECTIONS)
                self.assertIsInstance(field.metadata["recorded"], bool)

    def test_sections_hold_every_field_once_in_field_order(self):
        names = [f.name for f in dataclasses.fields(TrainerOptions)]
        sections = option_sections()
        self.assertEqual(list(sections), list(SECTIONS))
        self.assertTrue(all(sections.values()), sections)
        grouped = [name for members in sections.values() for name in members]
        self.assertCountEqual(grouped, names)
        for members in sections.values():
            self.assertEqual(members, sorted(members, key=names.index))

    def test_recorded_options_come_from_the_metadata(self):
        self.assertEqual(set(recorded_options()), RECORDED)
        self.assertEqual(resume._RECORDED_OPTIONS, recorded_options())

    def test_docstring_attributes_are_the_help(self):
        """Google-style `Attributes:`: one entry per field, its text the field's help."""
        doc = TrainerOptions.__doc__
        self.assertIn("\n    Attributes:\n", doc)
        attributes = " ".join(doc.split("Attributes:", 1)[1].split())
        for name, text in option_help().items():
            self.assertIn(f"{name}: {' '.join(text.split())}", attributes)


class ResumeLogsRecordedOptionsTest(absltest.TestCase):
    def test_a_changed_early_stop_patience_is_logged(self):
        saved = {"optimizer": "Adam", "learning_rate": 1e-3, "early_stop_patience": 3}
        now = {**saved, "early_stop_patience": 5, "penalties": {}}
        self.assertEqual(
            resume.changes({**saved, "penalties": {}}, now),
            ["early_stop_patience: 3 in the checkpointed run -> 5 now"],
        )

    def test_an_unrecorded_option_is_not_compared(self):
        saved = {"optimizer": "Adam", "learning_rate": 1e-3, "penalties": {}, "model_dir": "a"}
        self.assertEqual(resume.changes(saved, {**saved, "model_dir": "b"}), [])


if __name__ == "__main__":
    absltest.main()
