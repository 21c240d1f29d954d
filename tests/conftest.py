"""pytest setup: absltest helpers (create_tempdir, flagsaver) need absl flags parsed."""

from absl import flags


def pytest_configure(config):
    del config
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    """Drops `tf.test.TestCase.test_session`, a deprecated helper pytest mistakes for a test."""
    kept = [item for item in items if item.name != "test_session"]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.name == "test_session"])
        items[:] = kept
