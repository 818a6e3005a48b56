"""The wine model every peer serves, loaded the way this project's sklearn runtime loads it."""

from __future__ import annotations

import os

import skops.io


def load():  # noqa: ANN201 (a scikit-learn Pipeline; each peer's venv has its own scikit-learn)
    path = os.environ["PEER_MODEL_FILE"]
    return skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))
