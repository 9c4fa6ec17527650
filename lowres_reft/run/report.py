"""`runs/<run>/report.png`: reward, accuracy, rollout tokens/s and ESS over the steps of a run."""

from __future__ import annotations

from pathlib import Path

from lowres_reft.run.metrics import read_metrics
from lowres_reft.utils.fsutil import atomic_write


def write_report(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    rl = [r for r in records if r.get("stage") == "rl"]
    evals = [r for r in records if r.get("stage") == "eval"]
    steps = [r["step"] for r in rl]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "reward_mean", "mean reward of rollouts"),
        (axes[0, 1], "rollout_accuracy", "accuracy"),
        (axes[1, 0], "rollout_tokens_per_s", "rollout tokens/s"),
        (axes[1, 1], "ess", "ESS of the sequence weights"),
    ]
    for ax, key, title in panels:
        ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rl], label=f"rollouts ({key})")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0, 1].plot([e["step"] for e in evals], [e["eval_accuracy"] for e in evals], "o-", color="tab:red",
                    label="greedy eval accuracy")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "report.png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
