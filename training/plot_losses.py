"""Plot a run's training loss (per step and smoothed) and evaluation loss, and write them as JSON beside the plot.

    python training/plot_losses.py runs/smollm2_stdlib docs/training_smollm2_stdlib.png

Reads `<run>/trainer_state.json` (the Trainer's log history) and `<run>/step_times.json` (written by train.py).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SMOOTHING = 20  # steps in the moving average


def main(run: Path, plot: Path) -> None:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    seconds = json.loads((run / "step_times.json").read_text())
    train = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    evaluation = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    steps, losses = list(train), list(train.values())
    smoothed = [statistics.mean(losses[max(0, i - SMOOTHING + 1) : i + 1]) for i in range(len(losses))]

    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="training loss (one step)")
    axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"training loss ({SMOOTHING}-step mean)")
    axis.plot(list(evaluation), list(evaluation.values()), "o-", color="tab:red", label="held-out loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats / token)")
    axis.set_title(f"{run.name}: median {statistics.median(seconds):.1f} s / step")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=120)
    record = {"step": steps, "loss": losses, "eval_loss": evaluation, "step_seconds": seconds}
    plot.with_suffix(".json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
