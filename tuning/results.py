"""A sweep's results for people: every trial's sampled config and outcome in
`tune/trials.parquet`, and a plot of the metric against each searched parameter."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TRIALS_FILE = "trials.parquet"
PLOT_FILE = "metric_vs_params.png"
STATUS_COLORS = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}


def write_trials(trials: list[dict], out_dir: Path, metric: str, space: dict) -> dict[str, str]:
    """Write the trials table and the plot under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(trials)
    for column in frame.columns:  # a choice of mixed values (32, "auto") is one Parquet column of text
        if frame[column].dtype == object and frame[column].map(type).nunique() > 1:
            frame[column] = frame[column].map(lambda v: "" if v is None else str(v))
    frame.to_parquet(out_dir / TRIALS_FILE, index=False)
    plot_metric(frame, metric, space, out_dir / PLOT_FILE)
    return {"trials_file": str(out_dir / TRIALS_FILE), "plot": str(out_dir / PLOT_FILE)}


def plot_metric(frame: pd.DataFrame, metric: str, space: dict, path: Path) -> None:
    """One panel per searched parameter: each trial's best metric against its value, coloured by
    how the trial ended (a failed trial, with no metric, is marked at the bottom of its panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    paths = list(space)
    fig, axes = plt.subplots(1, len(paths), figsize=(4 * len(paths), 3.4), squeeze=False)
    scores = pd.to_numeric(frame[metric], errors="coerce")
    floor = scores.min() if scores.notna().any() else 0.0
    for ax, name in zip(axes[0], paths):
        values = frame[name]
        numeric = pd.api.types.is_numeric_dtype(values) and space[name].get("choice") is None
        if numeric:
            x = values.astype(float)
        else:
            categories = list(dict.fromkeys(str(v) for v in (space[name].get("choice") or values)))
            x = values.map(lambda v: categories.index(str(v)) if str(v) in categories else -1)
            ax.set_xticks(range(len(categories)), categories)
        for status, color in STATUS_COLORS.items():
            chosen = frame["status"] == status
            if chosen.any():
                y = scores[chosen].fillna(floor)
                ax.scatter(x[chosen], y, c=color, label=status, marker="x" if status == "error" else "o", s=36)
        if space[name].get("loguniform") is not None:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow decade's minor labels overlap
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{metric} of each trial (its best report) against the searched values")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
