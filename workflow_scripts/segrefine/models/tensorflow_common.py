"""What the StarDist and U-Net adapters (TensorFlow 2 / Keras 3, tensorflow env) share: TensorFlow's logging
quieted, seeding and the device they report. TensorFlow is imported only when called."""

from __future__ import annotations

import os


def quiet_tensorflow() -> None:
    """TensorFlow's C++ log without its info lines (set before TensorFlow is imported; a user's setting wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def seed_tensorflow(seed: int) -> None:
    """Python's, numpy's and TensorFlow's generators seeded, and TensorFlow's ops deterministic."""
    quiet_tensorflow()
    import tensorflow as tf

    tf.keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def tensorflow_device() -> str:
    """The GPU ("gpu:0") when TensorFlow sees one, the CPU ("cpu") otherwise."""
    import tensorflow as tf

    return "gpu:0" if tf.config.list_physical_devices("GPU") else "cpu"
