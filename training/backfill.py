"""Reference statistics for models stored before they were: ``python -m training.backfill``.

A stored model's folder is covered by the SHA-256 of every file recorded when it was saved, so a file
added now would make the model fail verification (``common/store.verify``). The backfilled reference
goes beside the model store instead (``$BENTOML_HOME/references/<name>/<version>.json``), bound to the
hash the model recorded for its weights and carrying its own hash: a retrained model or an altered
file makes it unused, never trusted. It is computed exactly as training computes it, from the same
split and the model's stored test-split probabilities, so no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import datasets, reference, store
from common.logs import get_logger, setup_logging

log = get_logger("backfill")


def backfill(home: Path, force: bool = False) -> list[str]:
    """Write the sidecar of every stored model without a reference (``force``: rewrite sidecars);
    the tags written."""
    written = []
    for model in store.list_models():
        own = Path(model.path) / reference.REFERENCE_FILE
        if own.is_file() or (not force and store.stored_reference(model, home) is not None):
            continue
        metadata = model.info.metadata
        recorded = (metadata.get(store.HASHES_KEY) or {}).get(str(metadata["file"])) \
            or metadata.get(store.LEGACY_HASH_KEY)
        if not recorded:
            log.warning("no recorded hash to bind a reference to; retrain it", extra={"tag": str(model.tag)})
            continue
        data = datasets.load(model.info.labels["family"])
        computed = reference.compute(data.x_train, data.y_train, data.classes, data.feature_names,
                                     store.stored_test_probs(model))
        reference.write_sidecar(reference.sidecar_path(home, model.tag.name, model.tag.version), recorded, computed)
        written.append(str(model.tag))
        log.info("reference backfilled", extra={"tag": str(model.tag)})
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.backfill", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rewrite existing sidecars")
    args = parser.parse_args(argv)
    setup_logging()
    written = backfill(Path(store.bentoml_home()), args.force)
    print(f"{len(written)} reference(s) backfilled in {store.bentoml_home()}: {', '.join(written) or 'none needed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
