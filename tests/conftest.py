"""pytest setup: fixtures importable, a temporary folder of this session's own, parsed absl flags,
2 logical CPUs for strategy tests, quiet TF logs."""

import os
import shutil
import sys
import tempfile

from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test tasks and plugins, imported by tests and by `--import=` alike.
FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
if FIXTURES_DIR not in sys.path:
    sys.path.insert(0, FIXTURES_DIR)

# absltest's `create_tempdir("name")` is `<TEST_TMPDIR>/<class>/<test>/name`, emptied first: two
# sessions at once (another checkout's, say) would share /tmp/absl_testing and empty each other's.
# Subprocesses (and pytest-xdist's workers) inherit this session's.
_OWN_TMPDIR = None if "TEST_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="tapeloop_tests_")
if _OWN_TMPDIR:
    os.environ["TEST_TMPDIR"] = _OWN_TMPDIR

CPU_REPLICAS = 2


def pytest_configure(config):
    del config
    # absltest helpers (create_tempdir, flagsaver) need parsed flags.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # Logical devices can only be set before TensorFlow runs its first op, so once for all
    # tests; tests without a strategy still run on /cpu:0 alone.
    from trainer.distribution import configure_cpu_replicas

    configure_cpu_replicas(CPU_REPLICAS)


def pytest_unconfigure(config):
    del config
    if _OWN_TMPDIR:
        shutil.rmtree(_OWN_TMPDIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Drops `tf.test.TestCase.test_session`, a deprecated helper pytest mistakes for a test."""
    kept = [item for item in items if item.name != "test_session"]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.name == "test_session"])
        items[:] = kept
