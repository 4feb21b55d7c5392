"""The loss curve of a run, drawn from its metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def plot_metrics(metrics_csv: str | Path, png: str | Path) -> Path | None:
    """Write training (and validation) loss against tokens to `png`; None when there is nothing to draw."""
    if not Path(metrics_csv).exists():
        return None
    rows = read_metrics(metrics_csv)
    train = [(int(r["tokens"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return Path(png)
