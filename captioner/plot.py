"""Training curves as a PNG, so a run can be judged at a glance."""

from __future__ import annotations

import os


def plot_history(history: list[dict], path: str | os.PathLike) -> None:
    """Plot training loss (or self-critical reward) and dev BLEU-4 / CIDEr-D per epoch into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "cross-entropy loss"), ("train_reward", "self-critical reward (CIDEr-D)")):
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            left.plot(*zip(*points, strict=True), marker="o", label=label)
    left.set(title="training", xlabel="epoch")
    if left.lines:  # a run that has only scored its starting model has nothing to show here yet
        left.legend()
    for name in ("BLEU-4", "CIDEr-D"):
        right.plot(epochs, [r[name] for r in history], marker="o", label=name)
    right.set(title="dev scores", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
