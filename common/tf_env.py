"""TensorFlow and Keras, imported so that they can share a process with PyTorch.

- Quiet: TF's C++ logs go to stderr unless told otherwise before the import.
- triton first: ``torch.export.load`` imports triton, whose LLVM crashes the process (SIGSEGV) when
  it is loaded after TensorFlow's; loaded first, both live in one process.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

with contextlib.suppress(ImportError):
    import triton  # noqa: F401

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf"]
