"""pytest setup: absltest helpers (create_tempdir, flagsaver) need absl flags parsed."""

from absl import flags


def pytest_configure(config):
    del config
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
