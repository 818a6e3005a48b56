"""cancer: a Keras 3 MLP on the 30 breast-cancer features, stored in the native ``.keras`` format.

``.keras`` loads with Keras' safe mode (no lambda or pickled code), and the model adapts its own
``Normalization`` layer, so it takes raw feature values like every other runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.datasets import Dataset
from common.tf_env import keras, tf

FRAMEWORK = "tf"
MODEL_FILE = "model.keras"
VERSIONS: dict[str, dict[str, Any]] = {
    "v1": {"hidden": [64, 32], "dropout": 0.0, "epochs": 30, "lr": 1e-3},
    "v2": {"hidden": [256, 256], "dropout": 0.5, "epochs": 40, "lr": 5e-4},
}
BATCH_SIZE = 32


def train(data: Dataset, version: str):
    from training.base import Trained

    hp = VERSIONS[version]
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    normalise = keras.layers.Normalization(name="normalise")
    normalise.adapt(data.x_train)
    layers: list[keras.layers.Layer] = [keras.Input((data.x_train.shape[1],), name="features"), normalise]
    for width in hp["hidden"]:
        layers.append(keras.layers.Dense(width, activation="relu"))
        if hp["dropout"]:
            layers.append(keras.layers.Dropout(hp["dropout"]))
    layers.append(keras.layers.Dense(len(data.classes), activation="softmax", name="probabilities"))
    model = keras.Sequential(layers, name=f"cancer_mlp_{version}")
    model.compile(
        optimizer=keras.optimizers.Adam(hp["lr"]), loss="sparse_categorical_crossentropy"
    )
    model.fit(data.x_train, data.y_train, epochs=hp["epochs"], batch_size=BATCH_SIZE, verbose=0)

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        return np.asarray(model(rows, training=False))

    def write(folder: Path) -> str:
        model.save(folder / MODEL_FILE)
        return MODEL_FILE

    return Trained(
        framework=FRAMEWORK,
        format="keras",
        write=write,
        predict_proba=predict_proba,
        hyperparameters=hp,
        libraries=("tensorflow-cpu", "keras"),
    )
