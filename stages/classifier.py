"""Stage `classifier`: train a small convolutional classifier on the digits train split.

Its penultimate layer gives the features of the Frechet distance between generated and
held-out digits, and its predictions give the class balance of generated digits. The
stage fails when the held-out accuracy falls below ``classifier.min_accuracy``, because
features of a poor classifier would make those metrics meaningless.

Writes ``data/models/classifier.pt`` (``load_classifier`` reads it),
``reports/metrics/classifier.json`` (held-out accuracy) and
``reports/timing/classifier.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flowmatch.datasets import DIGITS_CLASSES
from stages.common import StageError, load_npz, run_stage, save_torch, seed_everything, write_json
from stages.config import ClassifierParams, load_params

log = logging.getLogger("flowmatch.classifier")

PREPARED_PATH = Path("data/prepared/digits.npz")
MODEL_PATH = Path("data/models/classifier.pt")
METRICS_PATH = Path("reports/metrics/classifier.json")
TIMING_PATH = Path("reports/timing/classifier.json")


class DigitClassifier(nn.Module):
    """Convolutional classifier of ``(n, 1, 8, 8)`` digit images in ``[-1, 1]``.

    Two 3x3 convolutions (32 and 64 channels), 2x2 max pooling, then a hidden layer of
    ``features`` units, whose ReLU output is what ``features`` returns, and a linear
    layer to ``n_classes`` logits.
    """

    def __init__(self, features: int = 128, n_classes: int = DIGITS_CLASSES):
        super().__init__()
        self.config = {"features": features, "n_classes": n_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the penultimate-layer activations ``(n, features)``."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


@torch.no_grad()
def classify(model: DigitClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features (n, f) float64, predicted labels (n,) int64)`` for ``images (n, 1, 8, 8)``."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    features, labels = [], []
    for start in range(0, len(images), batch_size):
        hidden = model.features(images[start : start + batch_size])
        features.append(hidden.double().numpy())
        labels.append(model.head(hidden).argmax(dim=1).numpy())
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Return the fraction of ``images`` whose predicted class equals ``labels``."""
    _, predicted = classify(model, images)
    return float((predicted == labels).mean())


def train_classifier(train: np.ndarray, labels: np.ndarray, config: ClassifierParams, seed: int) -> tuple[DigitClassifier, float, int]:
    """Train with Adam and cross-entropy on shuffled minibatches and return ``(model, last epoch loss, steps)``."""
    seed_everything(seed)
    model = DigitClassifier(features=config.features)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    images = torch.as_tensor(train)
    targets = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)

    steps = 0
    epoch_loss = float("nan")
    model.train()
    for _ in tqdm(range(config.epochs), desc="classifier epochs", unit="epoch"):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = nn.functional.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            steps += 1
        epoch_loss = total / len(images)
    model.eval()
    return model, epoch_loss, steps


def load_classifier(path: str | Path = MODEL_PATH) -> DigitClassifier:
    """Load the classifier written by this stage in eval mode, or raise ``StageError`` if it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found; run the classifier stage first (dvc repro classifier)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitClassifier(**checkpoint["config"])
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as error:  # torch raises several types for truncated or altered files
        raise StageError(f"{path}: cannot read the classifier ({type(error).__name__}: {error}). Delete it and rerun dvc repro.") from error
    return model.eval()


def main() -> None:
    params = load_params()
    config = params.classifier
    digits = load_npz(PREPARED_PATH)

    # One thread: the batches are too small to gain from more, and on a busy machine
    # threads that wait for each other make training several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        model, loss, steps = train_classifier(digits["train"], digits["train_labels"], config, params.seed)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    heldout_accuracy = accuracy(model, digits["test"], digits["test_labels"])
    train_accuracy = accuracy(model, digits["train"], digits["train_labels"])
    log.info("held-out accuracy %.4f, train accuracy %.4f, last epoch loss %.4f, %d steps in %.1f s", heldout_accuracy, train_accuracy, loss, steps, seconds)
    if heldout_accuracy < config.min_accuracy:
        raise StageError(
            f"classifier held-out accuracy {heldout_accuracy:.4f} is below classifier.min_accuracy = {config.min_accuracy}. "
            "Train longer (classifier.epochs) or change classifier.lr."
        )

    save_torch(MODEL_PATH, {"config": model.config, "state_dict": model.state_dict()})
    write_json(
        METRICS_PATH,
        {
            "accuracy": heldout_accuracy,
            "train_accuracy": train_accuracy,
            "loss": loss,
            "n_train": len(digits["train"]),
            "n_test": len(digits["test"]),
        },
    )
    write_json(TIMING_PATH, {"seconds": seconds, "steps_per_second": steps / seconds})
    log.info("wrote %s, %s and %s", MODEL_PATH, METRICS_PATH, TIMING_PATH)


if __name__ == "__main__":
    run_stage(main)
