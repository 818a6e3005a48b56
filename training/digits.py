"""digits: a small PyTorch CNN on 8x8 grey images, stored as a ``torch.export`` program.

``torch.export`` is loaded without unpickling arbitrary objects, unlike ``torch.save`` of a module,
and needs no model class at load time. Normalisation is a layer of the model, so the stored program
takes raw pixels (0..16, as sklearn ships them) and every runtime, ONNX included, sees the same input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from common.datasets import Dataset

FRAMEWORK = "torch"
MODEL_FILE = "model.pt2"
VERSIONS: dict[str, dict[str, Any]] = {
    "v1": {"channels": [16, 32], "hidden": 64, "dropout": 0.0, "epochs": 30, "lr": 2e-3},
    "v2": {"channels": [32, 64], "hidden": 128, "dropout": 0.25, "epochs": 40, "lr": 1e-3},
}
BATCH_SIZE = 64
MAX_ROTATION_DEGREES = 8.0
MAX_SHIFT = 0.1
"""Of the image's width and height."""
SCALES = (0.9, 1.1)
MAX_EXPORT_BATCH = 4096


class DigitsCNN(nn.Module):
    def __init__(self, channels: list[int], hidden: int, dropout: float, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.unsqueeze(1) - self.mean) / self.std
        return torch.softmax(self.head(self.features(x)), dim=1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small shifts, rotations and zooms, drawn per image: handwritten digits are rarely centred the
    same way twice. torchvision's ``RandomAffine`` runs the same two torch calls (``affine_grid``,
    ``grid_sample``); torchvision itself is not a dependency because its wheels need the CUDA build of
    torch, and the CPU build saves every serving worker ~150 MiB (docs/performance.md)."""
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    angle = torch.deg2rad(uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    scale = uniform(*SCALES)
    shift = torch.stack([uniform(-MAX_SHIFT, MAX_SHIFT), uniform(-MAX_SHIFT, MAX_SHIFT)], dim=1) * 2  # in -1..1
    # affine_grid maps each output pixel to where it samples the input: the inverse of rotate-zoom-shift.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inverse = torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)
    offset = -(inverse @ shift.unsqueeze(2))
    grid = functional.affine_grid(torch.cat([inverse, offset], dim=2), list(images.shape), align_corners=False)
    return functional.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train(data: Dataset, version: str):
    from training.base import Trained

    hp = VERSIONS[version]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    model = DigitsCNN(hp["channels"], hp["hidden"], hp["dropout"], float(x.mean()), float(x.std()))
    optimiser = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    loss_fn = nn.NLLLoss()
    for _ in range(hp["epochs"]):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            images = augment(x[idx].unsqueeze(1), generator).squeeze(1)
            optimiser.zero_grad()
            loss = loss_fn(torch.log(model(images) + 1e-9), y[idx])
            loss.backward()
            optimiser.step()
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(
        model, (torch.from_numpy(data.x_test[:2]),), dynamic_shapes={"pixels": {0: batch}}
    )
    module = program.module()

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows)).numpy()

    def write(folder: Path) -> str:
        torch.export.save(program, folder / MODEL_FILE)
        return MODEL_FILE

    return Trained(
        framework=FRAMEWORK,
        format="torch.export",
        write=write,
        predict_proba=predict_proba,
        hyperparameters=hp,
        libraries=("torch",),
    )
