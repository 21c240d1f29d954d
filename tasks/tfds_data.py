"""TFDS loading that fails fast, in one line, when data is neither prepared nor downloadable."""

from __future__ import annotations

import os
import socket

import tensorflow as tf

from trainer import ConfigError


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load(name: str, split: str, data_dir: str | None, download_host: str) -> tf.data.Dataset:
    """`tfds.load(name, split=split, as_supervised=True)`, prepared data first.

    If the data is not prepared in `data_dir`, it is downloaded only when `download_host`
    answers: without network TFDS would otherwise spend minutes in retries.

    Raises:
      ConfigError: the data is not prepared and cannot be downloaded.
    """
    import tensorflow_datasets as tfds

    kwargs = {"split": split, "as_supervised": True, "data_dir": data_dir}
    try:
        return tfds.load(name, download=False, **kwargs)
    except AssertionError:
        if not _reachable(download_host):
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            raise ConfigError(
                f"TFDS dataset {name!r} is not prepared in {where} and {download_host} is "
                f"unreachable: run `tfds build {name} --data_dir=DIR` where there is network, "
                "then pass --data_dir=DIR."
            ) from None
    return tfds.load(name, download=True, **kwargs)
