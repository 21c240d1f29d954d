"""Files a run reads, damaged inside: one line and nothing overwritten; a second Trainer in
the same process resumes the run (matched by structure, not Keras' paths); options whose state
a checkpoint lacks or holds extra are named."""

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from array_task import ArrayTask, regression_data
from cli_runner import CliResult, context, last_line
from test_resume import ResumeTestCase, final_weights

from tasks.synthetic import SyntheticRegression, make_data
from trainer import TrainerOptions
from trainer.errors import ConfigError

TINY = ("--import=cli_plugin", "--task=tiny_linear")  # Dense(1), SGD: seconds per run


def snapshot(directory: str) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def edit_json(path: str, change: Callable[[Any], None]) -> None:
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def checkpoint_values(path: str, name: str) -> list[np.ndarray]:
    """The checkpoint's list (or position-keyed) object `name`, in order."""
    reader = tf.train.load_checkpoint(path)
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith(f"{name}/")]
    return [reader.get_tensor(k) for k in sorted(keys, key=lambda k: int(k.split("/")[1]))]


def auto_named(width: int = 3) -> keras.Model:
    """4 -> Dense(width) -> Dense(2) with the names Keras makes up (`sequential_7/dense_12`)."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(2)])


def set_field(field: str, value: Any) -> Callable[[Any], None]:
    """A change of the JSON value at `field` (`a.b[1].c`) to `value`."""

    def change(root: Any) -> None:
        *parents, last = field.replace("[", ".").replace("]", "").split(".")
        for key in parents:
            root = root[int(key)] if isinstance(root, list) else root[key]
        root[int(last) if isinstance(root, list) else last] = value

    return change


class DamagedFileTest(ResumeTestCase, parameterized.TestCase):
    """Each file a resumed run reads, damaged in one place: exit 2, one line naming the file
    and the field, and every file of the run left byte for byte as it was."""

    _trained: ClassVar[str | None] = None

    def trained(self) -> str:
        """A copy, of this test's own, of a 100-step run with a penalty and kept best weights."""
        if type(self)._trained is None:
            source = tempfile.mkdtemp()
            type(self).addClassCleanup(shutil.rmtree, source, ignore_errors=True)
            self.cli(f"--model_dir={source}/run", "--train_steps=100", "--checkpoint_every=50",
                     "--eval_every=50", "--keep_best", "--penalty=l2(1e-3)")  # fmt: skip
            type(self)._trained = f"{source}/run"
        model_dir = os.path.join(self.model_dir(), "run")
        shutil.copytree(self._trained, model_dir)
        return model_dir

    def refused(self, model_dir: str) -> str:
        """The last line of a resume that must be refused, after checking that it is one
        usage error and that no file of the run changed."""
        before = snapshot(model_dir)
        result = self.cli(f"--model_dir={model_dir}", "--train_steps=200",
                          "--penalty=l2(1e-3)", "--keep_best", "--eval_every=50",
                          status=2)  # fmt: skip
        line = last_line(result.stderr)
        self.assertStartsWith(line, "trainer: error: ", context(result))
        after = snapshot(model_dir)
        for name, content in before.items():
            self.assertEqual(after.get(name), content, f"{name} changed")
        self.assertNotIn("ckpt-200.index", after)
        return line

    @parameterized.named_parameters(
        ("settings_a_string", "settings", "fast", "`settings` should be an object, not a string"),
        ("penalty_entry_a_string", "settings.penalties.l2", "l2(1e-3)",
         "`settings.penalties.l2` should be an object, not a string ('l2(1e-3)')"),
        ("option_of_another_type", "settings.batch_size", "64",
         "`settings.batch_size` should be an integer, not a string"),
        ("variables_an_object", "variables", {}, "`variables` should be a list, not an object"),
        ("variable_shape_a_string", "variables[1].shape", "[256]",
         "`variables[1].shape` should be a list, not a string"),
        ("variable_path_missing", "variables[2]", {"shape": [256, 256]},
         "`variables[2].path` is missing"),
    )  # fmt: skip
    def test_tapeloop_json(self, field, value, expected):
        model_dir = self.trained()
        path = os.path.join(model_dir, "tapeloop.json")
        edit_json(path, set_field(field, value))
        line = self.refused(model_dir)
        self.assertIn(f"{path!r} is damaged: field {expected}", line)
        self.assertIn("it is left as it is: fix it, or remove it", line)

    @parameterized.named_parameters(
        ("step_a_string", "step", "100", "`step` should be an integer, not a string ('100')"),
        ("metric_a_string", "loss", "low", "`loss` should be a number or null, not a string"),
    )
    def test_best_json(self, field, value, expected):
        model_dir = self.trained()
        path = os.path.join(model_dir, "best", "best.json")
        edit_json(path, set_field(field, value))
        self.assertIn(f"{path!r} is damaged: field {expected}", self.refused(model_dir))

    @parameterized.named_parameters(
        ("garbled", "garbage {{{", "it is not a checkpoint state"),
        ("empty", "", "it is empty"),
        ("naming_a_missing_checkpoint", 'model_checkpoint_path: "ckpt-999"\n',
         "it names '{dir}/ckpt-999', which does not exist"),
        ("listing_a_missing_checkpoint",
         'model_checkpoint_path: "ckpt-100"\nall_model_checkpoint_paths: "ckpt-70"\n',
         "it names '{dir}/ckpt-70', which does not exist"),
        ("pointing_outside", 'model_checkpoint_path: "../other/ckpt-100"\n',
         "it names '{dir}/../other/ckpt-100', outside the directory"),
        ("best_garbled", "garbage {{{", "it is not a checkpoint state", "best"),
    )  # fmt: skip
    def test_state_file(self, content, expected, folder=""):
        """The message says what a rebuilt state file would name: the newest readable."""
        model_dir = self.trained()
        directory = os.path.join(model_dir, folder) if folder else model_dir
        path = os.path.join(directory, "checkpoint")
        with open(path, "w") as f:
            f.write(content)
        line = self.refused(model_dir)
        self.assertIn(f"{path!r} is damaged: {expected.format(dir=directory)}", line)
        steps = [
            int(p.split("-")[-1][: -len(".index")]) for p in glob.glob(f"{directory}/ckpt-*.index")
        ]
        newest = os.path.join(directory, f"ckpt-{max(steps)}")  # best/ keeps one
        self.assertIn(f"remove it to have it rebuilt from the checkpoint files (it would name "
                      f"{newest}, the newest readable)", line)  # fmt: skip

    def test_records_written_before_dtypes_resume_when_the_structure_matches(self):
        """`variables` as `[[path, shape], ...]` (tapeloop.json before dtypes were recorded):
        accepted when the shapes match; a wrong shape is still a different model."""
        model_dir = self.trained()
        path = os.path.join(model_dir, "tapeloop.json")

        def old_format(record):
            record["variables"] = [[v["path"], v["shape"]] for v in record["variables"]]

        edit_json(path, old_format)
        edit_json(path, set_field("variables[2][1]", [256, 128]))
        line = self.refused(model_dir)
        self.assertIn("holds a different model (sequential/dense_1/kernel: [256, 128] -> "
                      "[256, 256]); use another --model_dir", line)  # fmt: skip
        edit_json(path, set_field("variables[2][1]", [256, 256]))
        resumed = self.cli(f"--model_dir={model_dir}", "--train_steps=150", "--penalty=l2(1e-3)")
        self.assertIn(f"Restored {model_dir}/ckpt-100", resumed.stderr)
        with open(path) as f:  # rewritten as now
            self.assertEqual(json.load(f)["variables"][2]["dtype"], "float32")


class SameProcessResumeTest(tf.test.TestCase):
    """A notebook's workflow: train a little, look, continue with a new Trainer."""

    def test_a_second_trainer_of_the_task_continues_the_run(self):
        """20 steps with trainer A, then trainer B (Keras names its layers `dense_3`...) to 40
        ≡ 40 steps at once: weights, the optimizer's iterations and moments, the EMA and the
        best weights kept (exported) are the same."""
        root = self.create_tempdir().full_path
        model_dir = os.path.join(root, "run")

        def options(**kwargs) -> TrainerOptions:  # without XLA: its compilation is not tested
            return SyntheticRegression.make_options(
                deterministic=True, ema_decay=0.9, keep_best=True, eval_every=10,
                steps_per_loop=10, jit_compile=False, **kwargs)  # fmt: skip

        first = SyntheticRegression(options(train_steps=20, model_dir=model_dir))
        first.train()
        halfway = first.model.get_weights()
        second = SyntheticRegression(
            options(train_steps=40, model_dir=model_dir, export_dir=os.path.join(root, "b"))
        )
        self.assertNotEqual(second.model.variables[0].path, first.model.variables[0].path)
        with self.assertLogs(logger="absl", level="INFO") as logs:
            self.assertEqual(second.train().step, 40)
        self.assertIn(f"Restored {model_dir}/ckpt-20", "\n".join(logs.output))
        straight = SyntheticRegression(
            options(
                train_steps=40,
                model_dir=os.path.join(root, "straight_run"),
                export_dir=os.path.join(root, "straight"),
            )
        )
        straight.train()

        self.assertEqual(int(second.optimizer.iterations.numpy()), 40)
        for resumed, reference in (
            (second.model.get_weights(), straight.model.get_weights()),
            ([v.numpy() for v in second.optimizer.variables],
             [v.numpy() for v in straight.optimizer.variables]),  # iterations, moments
        ):  # fmt: skip
            for a, b in zip(resumed, reference, strict=True):
                self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        with second.evaluated_weights(), straight.evaluated_weights():  # the EMA
            for a, b in zip(second.model.get_weights(), straight.model.get_weights()):
                self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        self.assertGreater(  # B trained on from A's weights: far from the end
            max(np.abs(a - b).max() for a, b in zip(halfway, straight.model.get_weights())), 1e-3
        )
        x = tf.constant(make_data()[2][:64])
        kept = tf.saved_model.load(os.path.join(root, "b"))
        reference = tf.saved_model.load(os.path.join(root, "straight"))
        self.assertAllClose(kept.serve(x), reference.serve(x), rtol=1e-6, atol=1e-6)

    def test_a_different_model_in_the_same_process_is_refused(self):
        model_dir = self.create_tempdir().full_path
        x, y = regression_data()
        options = TrainerOptions(batch_size=8, train_steps=10, model_dir=model_dir)
        ArrayTask(x, y, options, model_fn=auto_named).train()
        wider = ArrayTask(x, y, options, model_fn=lambda: auto_named(width=5))
        with self.assertRaisesRegex(
            ConfigError,
            r"holds a different model \(sequential_\d+/dense_\d+/kernel: \[4, 3\] -> \[4, 5\]; "
            r"sequential_\d+/dense_\d+/bias: \[3\] -> \[5\]; ",
        ) as raised:
            wider.train()
        self.assertNotIn("\n", str(raised.exception))

    def test_an_ema_checkpointed_by_weight_path_is_restored(self):
        """Checkpoints before positions held the EMA keyed by the writer's weight paths: a
        model whose paths differ restores it through tapeloop.json's table."""
        x, y = regression_data()
        model_dir = self.create_tempdir().full_path
        writer = ArrayTask(x, y, TrainerOptions(batch_size=8, train_steps=5, ema_decay=0.9),
                           model_fn=auto_named)  # fmt: skip
        writer.train()
        objects = writer.checkpoint_objects()  # the EMA keyed by path, as it was saved
        old = tf.train.Checkpoint(model_variables=list(writer.model.variables), **objects)
        tf.train.CheckpointManager(old, model_dir, 1).save(checkpoint_number=5)
        with open(os.path.join(model_dir, "tapeloop.json"), "w") as f:
            json.dump({"task": "ArrayTask", "settings": {},
                       "variables": [[v.path, list(v.shape)] for v in writer.model.variables]},
                      f)  # fmt: skip
        options = TrainerOptions(batch_size=8, train_steps=5, ema_decay=0.9, model_dir=model_dir)
        reader = ArrayTask(x, y, options, model_fn=auto_named)
        self.assertNotEqual(reader.model.variables[0].path, writer.model.variables[0].path)
        reader.train()
        averages = reader.checkpoint_objects()["ema_variables"]
        expected = objects["ema_variables"]
        for mine, theirs in zip(reader.model.trainable_variables, writer.model.trainable_variables):
            self.assertAllEqual(averages[mine.path], expected[theirs.path])
            self.assertGreater(np.abs(averages[mine.path].numpy() - mine.numpy()).max(), 1e-4)


class OptionsOnResumeTest(ResumeTestCase):
    """An option whose state the checkpoint lacks or holds extra: made to work, or named."""

    def test_ema_added_starts_from_the_restored_weights_and_removed_is_said(self):
        """Added at step 20 with m = 0.5: after one step the average is 0.5·w20 + 0.5·w21
        (from the initial weights it would be far off)."""
        model_dir = self.model_dir()
        self.cli(f"--model_dir={model_dir}", "--train_steps=20", "--checkpoint_every=10")
        added = self.cli(f"--model_dir={model_dir}", "--train_steps=21", "--ema_decay=0.5")
        self.assertIn(f"Checkpoint {model_dir}/ckpt-20 holds no ema_variables (ema_decay: 0.0 in "
                      "the checkpointed run -> 0.5 now): it starts from the restored weights",
                      added.stderr)  # fmt: skip
        w20 = checkpoint_values(f"{model_dir}/ckpt-20", "model_variables")
        w21 = checkpoint_values(f"{model_dir}/ckpt-21", "model_variables")
        average = checkpoint_values(f"{model_dir}/ckpt-21", "ema_variables")
        self.assertLen(average, len(w21))
        for a, before, after in zip(average, w20, w21, strict=True):
            np.testing.assert_allclose(a, 0.5 * before + 0.5 * after, rtol=1e-6, atol=1e-7)
        self.assertGreater(max(np.abs(a - b).max() for a, b in zip(w20, w21)), 1e-5)

        removed = self.cli(f"--model_dir={model_dir}", "--train_steps=30")
        self.assertIn(f"Checkpoint {model_dir}/ckpt-21 holds ema_variables, which this run does "
                      "not keep (ema_decay: 0.5 in the checkpointed run -> 0.0 now): not "
                      "restored", removed.stderr)  # fmt: skip
        self.assertEqual(checkpoint_values(f"{model_dir}/ckpt-30", "ema_variables"), [])

    def test_accumulate_steps_added_continues_the_run(self):
        """accumulate_steps keeps no state: added at step 20, the run lands where one without
        it does (two micro-batches of 32 sum to the gradient of the batch of 64)."""
        model_dir, straight = self.model_dir(), self.model_dir()
        self.cli(f"--model_dir={model_dir}", "--train_steps=20")
        resumed = self.cli(f"--model_dir={model_dir}", "--train_steps=40", "--accumulate_steps=2")
        self.assertIn("accumulate_steps: 1 in the checkpointed run -> 2 now", resumed.stderr)
        self.assertIn(f"Restored {model_dir}/ckpt-20", resumed.stderr)
        self.cli(f"--model_dir={straight}", "--train_steps=40")
        for a, b in zip(final_weights(model_dir), final_weights(straight), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    def test_mixed_float16_added_or_removed_is_refused_naming_it(self):
        """Its loss scale is part of the optimizer's state; mixed_bfloat16 has none: allowed."""
        plain, scaled = self.model_dir(), self.model_dir()
        self.cli(*TINY, f"--model_dir={plain}", "--train_steps=10")
        self.cli(*TINY, f"--model_dir={scaled}", "--train_steps=10",
                 "--mixed_precision=mixed_float16")  # fmt: skip
        for model_dir, now, before in (
            (plain, "mixed_float16", None),
            (scaled, None, "mixed_float16"),
        ):
            flag = [f"--mixed_precision={now}"] if now else []
            refused = self.cli(*TINY, f"--model_dir={model_dir}", "--train_steps=20", *flag,
                               status=2)  # fmt: skip
            self.assertIn("ckpt-10' holds the optimizer's state in another form (mixed_precision"
                          f": {before} in the checkpointed run, {now} now",
                          last_line(refused.stderr))  # fmt: skip
        allowed = self.cli(*TINY, f"--model_dir={plain}", "--train_steps=20",
                           "--mixed_precision=mixed_bfloat16")  # fmt: skip
        self.assertIn("mixed_precision: None in the checkpointed run -> mixed_bfloat16 now",
                      allowed.stderr)  # fmt: skip
        self.assertIn(f"Restored {plain}/ckpt-10", allowed.stderr)

    def test_momentum_added_is_refused(self):
        """SGD either way (the optimizer's class is the same), with momentum slots now."""
        model_dir = self.model_dir()
        self.cli(*TINY, f"--model_dir={model_dir}", "--train_steps=10")
        refused: CliResult = self.cli(*TINY, f"--model_dir={model_dir}", "--train_steps=20",
                                      "--optimizer=momentum", status=2)  # fmt: skip
        self.assertIn("holds the optimizer's state in another form (variables: 1 there, 3 now",
                      last_line(refused.stderr))  # fmt: skip


if __name__ == "__main__":
    absltest.main()
