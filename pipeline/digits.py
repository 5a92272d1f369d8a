"""A real trained model with no download: a small CNN on scikit-learn's bundled digits.

scikit-learn ships 1,797 real 8x8 handwritten digits inside the package. `train` fits the
CNN on a seeded 70% of them in a few seconds on one CPU core and writes what a user would
bring: the weights (safetensors, loaded through model.weights) and the held-out 30% as
samples and labels (.npy, read through data=tensors). Random weights hide what trained
models do to int8 (activation ranges, logits near zero); this one is trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Two convolutions and a classifier for 1x8x8 images; module paths as users write them."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def load(seed: int = 0, held_out: float = 0.3):
    """(train x, train y, test x, test y): images scaled to [0, 1] as float32 [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(len(x) * (1 - held_out))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(folder: Path, epochs: int = 15, seed: int = 0) -> dict[str, object]:
    """Train, then write weights.safetensors, x.npy and y.npy (the held-out split) into `folder`."""
    import numpy as np
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y, x_test, y_test = load(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    np.save(folder / "x.npy", x_test.numpy())
    np.save(folder / "y.npy", y_test.numpy().astype(np.int64))
    return {"weights": folder / "weights.safetensors", "x": folder / "x.npy", "y": folder / "y.npy",
            "top1": 100.0 * accuracy, "held_out": len(x_test)}


if __name__ == "__main__":  # python -m pipeline.digits FOLDER: what `make bench-quant` trains first
    import sys

    print(train(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits")))
