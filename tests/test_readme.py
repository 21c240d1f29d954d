"""README.md's examples, run as written: every Python block and every command.

A fenced block marked `<!-- sketch: reason -->` on the line before it is skipped, by name,
with that reason. A Python block whose first line is `# NAME.py` is a module: it is saved
as NAME.py in the working directory that every block and command of the README shares (the
README's commands `--import` it). Other Python blocks run as scripts; each line of a `sh`
block (continuations joined) runs with bash, except a plain `[VAR=value ...] python -m trainer
ARGS`, whose words are split as bash splits them and run in this process (`run_cli`, as in a
fresh process) with those variables, in the working directory. All must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized
from cli_runner import context, run_cli

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
TIMEOUT_S = 300

_FENCE = re.compile(
    r"(?:<!-- sketch: (?P<sketch>.*?) -->\n)?^```(?P<lang>python|sh)\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def readme_blocks(text: str) -> list[tuple[str, str, str, str | None]]:
    """`(name, language, body, sketch reason or None)` for each python/sh block, in order.

    A block's name is its section heading as a slug, numbered within the section.
    """
    fences = [m.span() for m in re.finditer(r"^```.*?^```$", text, re.MULTILINE | re.DOTALL)]
    headings = [
        (m.start(), m.group(1))
        for m in re.finditer(r"^#+ (.*)$", text, re.MULTILINE)
        if not any(start <= m.start() < end for start, end in fences)
    ]
    blocks, counts = [], {}
    for match in _FENCE.finditer(text):
        heading = [h for start, h in headings if start < match.start()][-1]
        slug = re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")
        counts[slug] = counts.get(slug, 0) + 1
        name = f"{slug}_{counts[slug]}"
        blocks.append((name, match.group("lang"), match.group("body"), match.group("sketch")))
    return blocks


def commands(body: str) -> list[str]:
    """The commands of a sh block: continuation lines joined, comments and blanks dropped."""
    joined = body.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


with open(os.path.join(REPO_DIR, "README.md")) as f:
    BLOCKS = readme_blocks(f.read())


def trainer_command(command: str) -> tuple[dict[str, str], list[str]] | None:
    """`(variables, ARGS)` of `[VAR=value ...] python -m trainer ARGS`, split as bash would;
    None for any other command, or one with shell operators or expansions."""
    if any(c in command for c in "$`*?~"):
        return None
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    if any(set(word) <= set(lexer.punctuation_chars) for word in words):
        return None
    variables = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0], re.DOTALL):
        name, value = words.pop(0).split("=", 1)
        variables[name] = value
    if words[:3] != ["python", "-m", "trainer"]:
        return None
    return variables, words[3:]


class ReadmeTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workdir = tempfile.mkdtemp(prefix="readme_")
        for _, language, body, _ in BLOCKS:
            module = re.match(r"# (\w+\.py)\n", body)
            if language == "python" and module:
                with open(os.path.join(cls.workdir, module.group(1)), "w") as f:
                    f.write(body)

    def run_in_workdir(self, args: list[str]) -> None:
        env = dict(os.environ)
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        # This interpreter's `python` first; the repository before an installed copy.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
        env["PYTHONPATH"] = os.pathsep.join([REPO_DIR, self.workdir])
        result = subprocess.run(args, cwd=self.workdir, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S, check=False)  # fmt: skip
        self.assertEqual(
            result.returncode, 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        self.assertNotIn("Traceback", result.stderr)

    def run_trainer_in_workdir(self, variables: dict[str, str], args: list[str]) -> None:
        """`python -m trainer ARGS` in this process, in the working directory (modules there
        importable) with `variables` in the environment."""
        cwd = os.getcwd()
        sys.path.insert(0, self.workdir)
        try:
            os.chdir(self.workdir)
            with mock.patch.dict(os.environ, variables):
                result = run_cli(*args)
        finally:
            os.chdir(cwd)
            sys.path.remove(self.workdir)
        self.assertEqual(result.returncode, 0, f"{args}{context(result)}")
        self.assertNotIn("Traceback", result.stderr)

    @parameterized.named_parameters((name, name) for name, *_ in BLOCKS)
    def test_block(self, name):
        _, language, body, sketch = next(b for b in BLOCKS if b[0] == name)
        if sketch:
            self.skipTest(f"sketch: {sketch}")
        if language == "python":  # a module is run too: it must import cleanly
            self.run_in_workdir([sys.executable, "-c", body])
            return
        for command in commands(body):
            trainer = trainer_command(command)
            if trainer:
                self.run_trainer_in_workdir(*trainer)
            else:
                self.run_in_workdir(["bash", "-c", command])

    def test_blocks_found_and_few_sketches(self):
        """The parser sees the README's examples: most run, sketches say why."""
        runnable = [b for b in BLOCKS if not b[3]]
        self.assertGreaterEqual(len(runnable), 6, [b[0] for b in BLOCKS])
        self.assertTrue(all(b[3].strip() for b in BLOCKS if b[3] is not None))
        self.assertIn(("python", True), {(b[1], "my_penalties.py" in b[2]) for b in runnable})

    def test_trainer_commands_are_split_as_bash_splits_them(self):
        self.assertEqual(
            trainer_command(
                "TF_CPP_MIN_LOG_LEVEL=2 python -m trainer --penalty=\"l2(1e-2, exclude='bias')\""
                " --train_steps=5"
            ),
            (
                {"TF_CPP_MIN_LOG_LEVEL": "2"},
                ["--penalty=l2(1e-2, exclude='bias')", "--train_steps=5"],
            ),
        )
        for other in ("python -m trainer --x=1 && echo done", "python -m trainer > log",
                      "python -m trainer --model_dir=$HOME/run", "tensorboard --logdir=runs",
                      "python -m trainer_other", "python3 -m trainer"):  # fmt: skip
            self.assertIsNone(trainer_command(other), other)


if __name__ == "__main__":
    absltest.main()
