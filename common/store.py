"""How models sit in the BentoML model store: tags, labels, metadata and files.

Every producer (training, conversion) writes through :func:`save` and every consumer (runtimes,
service, tests) reads the same keys, so the store is the only contract between them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any, Callable

import bentoml
import numpy as np
from bentoml._internal.models import ModelStore  # the store type bentoml.models.create takes

TEST_PROBS_FILE = "test_probs.npy"
"""Probabilities the model gave on the held-out test split when it was stored."""


def tag(family: str, framework: str, version: str, twin: str | None = None) -> str:
    """Stable, explicit tags such as ``digits_torch:v1`` or ``digits_torch_onnx_int8:v1``."""
    name = f"{family}_{framework}" + (f"_{twin}" if twin else "")
    return f"{name}:{version}"


def exists(model_tag: str) -> bool:
    try:
        bentoml.models.get(model_tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


def get(model_tag: str) -> bentoml.Model:
    """A stored model, or a NotFound error that says how to create it."""
    try:
        return bentoml.models.get(model_tag)
    except bentoml.exceptions.NotFound as err:
        raise bentoml.exceptions.NotFound(
            f"model {model_tag!r} is not in the model store {bentoml_home()}; "
            "run `make models` (training and conversion) to create what is missing"
        ) from err


def bentoml_home() -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.bentoml_home.get())


def save(
    model_tag: str,
    *,
    labels: dict[str, str],
    metadata: dict[str, Any],
    write: Callable[[Path], str],
    test_probs: np.ndarray,
    replace: bool = False,
    into: ModelStore | None = None,
) -> bentoml.Model:
    """Store a model: ``write`` puts its file into the model folder and returns the file name.

    ``into`` is another model store than ``BENTOML_HOME``'s (tests build small private ones)."""
    elsewhere = {"_model_store": into} if into is not None else {}
    if replace and exists(model_tag):
        bentoml.models.delete(model_tag)
    with bentoml.models.create(model_tag, labels=labels, metadata=dict(metadata), **elsewhere) as model:
        folder = Path(model.path)
        filename = write(folder)
        np.save(folder / TEST_PROBS_FILE, test_probs.astype(np.float32))
        model.info.metadata["file"] = filename
        model.info.metadata["file_bytes"] = (folder / filename).stat().st_size
        model.info.metadata["file_sha256"] = sha256(folder / filename)
    return model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remedy(model: bentoml.Model) -> str:
    """The command that re-creates a stored model."""
    labels = model.info.labels
    if labels.get("twin_of"):
        return f"python -m conversion --reconvert --family {labels['family']}"
    return f"python -m training --retrain --family {labels['family']} --version {labels['version']}"


def verify(model: bentoml.Model) -> None:
    """Refuse a model whose file is missing or differs from what was stored (corruption, tampering)."""
    path = model_file(model)
    expected = model.info.metadata.get("file_sha256")
    problem = None
    if not path.is_file():
        problem = f"its file {path} is missing"
    elif expected is None:
        problem = "it has no recorded checksum (stored by an older version)"
    elif sha256(path) != expected:
        problem = f"its file {path} does not match the checksum recorded when it was stored"
    if problem:
        raise bentoml.exceptions.BentoMLException(
            f"model {model.tag}: {problem}; re-create it with `{remedy(model)}`")


def model_file(model: bentoml.Model) -> Path:
    return Path(model.path) / str(model.info.metadata["file"])


def stored_test_probs(model: bentoml.Model) -> np.ndarray:
    return np.load(Path(model.path) / TEST_PROBS_FILE)


def library_versions(*packages: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in packages}


def list_models(**labels: str) -> list[bentoml.Model]:
    """Stored models whose labels match all of ``labels``, sorted by tag."""
    found = [
        m
        for m in bentoml.models.list()
        if all(m.info.labels.get(k) == v for k, v in labels.items())
    ]
    return sorted(found, key=lambda m: str(m.tag))
