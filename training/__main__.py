"""Train every demo model missing from the model store; ``--retrain`` replaces stored ones."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from common import datasets, reference, store, tables
from common.logs import get_logger, setup_logging

log = get_logger("training")

TRAINERS = {"digits": "training.digits", "cancer": "training.cancer", "wine": "training.wine"}
RUNTIMES = {"torch": "torch", "tf": "tensorflow", "sklearn": "sklearn"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--family", action="append", choices=datasets.FAMILIES,
                        help="train only this family (repeatable); default: all")
    parser.add_argument("--version", action="append", help="train only this version, e.g. v1")
    parser.add_argument("--retrain", action="store_true", help="replace models already stored")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    jobs = []
    for family in args.family or datasets.FAMILIES:
        trainer = importlib.import_module(TRAINERS[family])
        for version in trainer.VERSIONS:
            if args.version and version not in args.version:
                continue
            model_tag = store.tag(family, trainer.FRAMEWORK, version)
            if store.exists(model_tag) and not args.retrain:
                log.info("already stored", extra={"tag": model_tag})
                continue
            jobs.append((family, version, trainer, model_tag))

    rows = []
    for family, version, trainer, model_tag in tqdm(jobs, desc="training", unit="model"):
        data = datasets.load(family)
        started = time.perf_counter()
        trained = trainer.train(data, version)
        seconds = time.perf_counter() - started
        probs = trained.predict_proba(data.x_test)
        predicted = probs.argmax(axis=1)
        accuracy = float(accuracy_score(data.y_test, predicted))
        macro_f1 = float(f1_score(data.y_test, predicted, average="macro"))
        model = store.save(
            model_tag,
            labels={
                "framework": trained.framework,
                "runtime": RUNTIMES[trained.framework],
                "task": "classification",
                "family": family,
                "version": version,
                "precision": "fp32",
            },
            metadata={
                "dataset": data.source,
                "split": {"test_fraction": datasets.TEST_FRACTION, "seed": datasets.SEED,
                          "stratified": True},
                "input_shape": data.input_shape,
                "input_range": data.input_range,
                "dtype": "float32",
                # BentoML metadata cannot hold None: image families simply have no feature names
                **({"feature_names": data.feature_names} if data.feature_names else {}),
                "classes": data.classes,
                "format": trained.format,
                "hyperparameters": trained.hyperparameters,
                "metrics": {"accuracy": accuracy, "macro_f1": macro_f1},
                "train_size": int(len(data.x_train)),
                "test_size": int(len(data.x_test)),
                "train_seconds": round(seconds, 3),
                "library_versions": store.library_versions("numpy", "scikit-learn",
                                                           *trained.libraries),
            },
            write=trained.write,
            test_probs=probs,
            replace=args.retrain,
            reference=reference.compute(data.x_train, data.y_train, data.classes, data.feature_names, probs),
        )
        log.info("stored", extra={"tag": model_tag, "accuracy": accuracy})
        rows.append([model_tag, accuracy, macro_f1,
                     f"{model.info.metadata['file_bytes'] / 1024:.1f} KiB", round(seconds, 1)])

    if rows:
        print(tables.markdown(["tag", "accuracy", "macro F1", "size", "seconds"], rows))
    else:
        print("every model is already in the store", store.bentoml_home(),
              "(use --retrain to replace them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
