"""How models sit in the BentoML model store: tags, labels, metadata and files.

Every producer (training, conversion) writes through :func:`save` and every consumer (runtimes,
service, tests) reads the same keys, so the store is the only contract between them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from collections.abc import Callable, Mapping

import bentoml
import numpy as np
from bentoml._internal.models import ModelStore  # the store type bentoml.models.create takes

from common import reference as references
from common.errors import ConflictError, ForbiddenError, NotFoundError, RequestError

TEST_PROBS_FILE = "test_probs.npy"
"""Probabilities the model gave on the held-out test split when it was stored."""
HASHES_KEY = "files_sha256"
"""Metadata: the SHA-256 of every file in the model folder when it was stored, by relative path."""
LEGACY_HASH_KEY = "file_sha256"
"""Metadata of models stored before ``HASHES_KEY``: the model file's hash alone."""
BENTOML_RECORD = "model.yaml"
"""BentoML's own record of a model (labels, metadata, the hashes): written after the files."""


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
    reference: Mapping[str, Any] | None = None,
) -> bentoml.Model:
    """Store a model: ``write`` puts its file into the model folder and returns the file name.

    ``into`` is another model store than ``BENTOML_HOME``'s (tests build small private ones);
    ``reference`` (``common/reference.py``) is stored beside the model file, under the same hashes."""
    elsewhere = {"_model_store": into} if into is not None else {}
    if replace and exists(model_tag):
        bentoml.models.delete(model_tag)
    with bentoml.models.create(model_tag, labels=labels, metadata=dict(metadata), **elsewhere) as model:
        folder = Path(model.path)
        filename = write(folder)
        np.save(folder / TEST_PROBS_FILE, test_probs.astype(np.float32))
        if reference is not None:
            references.write(folder, reference)
        model.info.metadata["file"] = filename
        model.info.metadata["file_bytes"] = (folder / filename).stat().st_size
        model.info.metadata[HASHES_KEY] = {name: sha256(path) for name, path in _files(folder).items()}
    return model


def sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def remedy(model: bentoml.Model) -> str:
    """The command that re-creates a stored model."""
    labels = model.info.labels
    if labels.get("twin_of"):
        return f"python -m conversion --reconvert --family {labels['family']}"
    return f"python -m training --retrain --family {labels['family']} --version {labels['version']}"


class IntegrityError(Exception):
    """A stored model file that is not what was stored: changed, missing or added since."""

    def __init__(self, model: bentoml.Model, file: str, problem: str):
        super().__init__(f"model {model.tag}: file {Path(model.path) / file} {problem}; "
                         f"re-create the model with `{remedy(model)}`")
        self.model_tag = str(model.tag)
        self.file = file


@dataclass(frozen=True)
class Integrity:
    """What loading checked: ``verified`` when every file's hash was recorded at save time and matches;
    ``unrecorded`` when some file has no recorded hash (stored before hashes were recorded), so it
    could not be checked; ``unchecked`` lists those files."""

    status: Literal["verified", "unrecorded"]
    verified: tuple[str, ...]
    unchecked: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"status": self.status, "verified": list(self.verified),
                **({"unchecked": list(self.unchecked)} if self.unchecked else {})}


def verify(model: bentoml.Model) -> Integrity:
    """Every file of a stored model against the SHA-256 recorded when it was saved, or the
    :class:`IntegrityError` that names the model and the first file that differs (corruption,
    tampering, a half-finished copy). ``model.yaml`` holds the record itself, so it is not covered:
    this detects changed files, not a forger who also rewrites the record."""
    metadata = model.info.metadata
    on_disk = _files(Path(model.path))
    recorded: dict[str, str] = dict(metadata.get(HASHES_KEY) or {})
    legacy = HASHES_KEY not in metadata
    if legacy and LEGACY_HASH_KEY in metadata:
        recorded = {str(metadata["file"]): str(metadata[LEGACY_HASH_KEY])}
    missing = sorted({*recorded, str(metadata["file"])} - set(on_disk))
    if missing:
        raise IntegrityError(model, missing[0], "is missing")
    for name, digest in sorted(recorded.items()):
        if sha256(on_disk[name]) != digest:
            raise IntegrityError(model, name, "does not match the SHA-256 recorded when the model was stored")
    unchecked = tuple(sorted(set(on_disk) - set(recorded)))
    if unchecked and not legacy:
        raise IntegrityError(model, unchecked[0], "was not there when the model was stored")
    return Integrity("unrecorded" if unchecked else "verified", tuple(sorted(recorded)), unchecked)


def import_model(path: str, import_dir: Path | None, into: ModelStore | None = None) -> bentoml.Model:
    """A ``.bentomodel`` file (made by ``bentoml models export``) put into the model store, then every
    file checked against the hashes recorded when it was first stored (:func:`verify`): anything short
    of a whole, unchanged model of this project is removed again. ``path`` (relative to ``import_dir``,
    or absolute) must resolve, symlinks followed, to a file under ``import_dir``: the only directory
    the service reads imports from (none: imports are refused). Each refusal names ``path``. ``into``:
    another model store than ``BENTOML_HOME``'s, as for :func:`save`."""
    elsewhere = {"_model_store": into} if into is not None else {}
    if import_dir is None:
        raise ForbiddenError("path", "imports are disabled on this server",
                             "set repository.import_dir in config.yaml (or BUNDLE_IMPORT_DIR)")
    root = import_dir.resolve()
    file = (root / path).resolve()
    if not file.is_relative_to(root):
        raise ForbiddenError("path", f"{path!r} is outside the import directory", f"a file under {root}")
    if not file.is_file():
        raise NotFoundError("path", f"{path!r} is not a file in the import directory", f"a file under {root}")
    try:
        model = bentoml.models.import_model(str(file), **elsewhere)
    except bentoml.exceptions.BentoMLException as err:
        if "already exists" in str(err):
            raise ConflictError("path", f"{path!r}: {err}", "a model whose tag is not stored yet") from None
        raise RequestError("path", f"{path!r} is not a model archive: {err}",
                           "a .bentomodel file made by `bentoml models export`") from None
    except Exception as err:  # a truncated or garbled archive fails in the decompressor or tar reader
        raise RequestError("path", f"{path!r} is not a readable .bentomodel archive (corrupted or "
                           f"truncated?): {err}", "a .bentomodel file made by `bentoml models export`") from None
    problem = _unverified(model)
    if problem is not None:
        bentoml.models.delete(model.tag, **elsewhere)
        raise RequestError("path", f"{path!r}: {problem}", "a model whose files are as they were stored")
    return model


def _unverified(model: bentoml.Model) -> str | None:
    """Why an imported model cannot be trusted, or None: every file as recorded when it was stored."""
    if not {HASHES_KEY, "file"} <= set(model.info.metadata):
        return f"records no {HASHES_KEY}: not a model stored by this project (common/store.py save)"
    try:
        verify(model)
    except IntegrityError as err:
        return str(err)
    return None


def _files(folder: Path) -> dict[str, Path]:
    """A model folder's files by relative path, but BentoML's own record of the model."""
    files = {path.relative_to(folder).as_posix(): path
             for path in sorted(folder.rglob("*")) if path.is_file()}
    files.pop(BENTOML_RECORD, None)
    return files


def model_file(model: bentoml.Model) -> Path:
    return Path(model.path) / str(model.info.metadata["file"])


def stored_test_probs(model: bentoml.Model) -> np.ndarray:
    return np.load(Path(model.path) / TEST_PROBS_FILE)


def stored_reference(model: bentoml.Model, home: Path | None = None) -> dict[str, Any] | None:
    """A model's reference statistics: its own file, else a backfilled sidecar made for its weights."""
    own = Path(model.path) / references.REFERENCE_FILE
    if own.is_file():
        return dict(json.loads(own.read_text()))
    recorded = (model.info.metadata.get(HASHES_KEY) or {}).get(str(model.info.metadata["file"])) \
        or model.info.metadata.get(LEGACY_HASH_KEY)
    if not recorded:
        return None
    return references.read_sidecar(
        references.sidecar_path(home or Path(bentoml_home()), model.tag.name, model.tag.version), recorded)


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
