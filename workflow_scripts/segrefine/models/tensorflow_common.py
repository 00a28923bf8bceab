"""What the StarDist and U-Net adapters (TensorFlow 2 / Keras 3, tensorflow env) share: the device they report.
TensorFlow is imported only when called."""

from __future__ import annotations


def tensorflow_device() -> str:
    """The GPU ("gpu:0") when TensorFlow sees one, the CPU ("cpu") otherwise."""
    import tensorflow as tf

    return "gpu:0" if tf.config.list_physical_devices("GPU") else "cpu"
