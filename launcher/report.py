"""What a finished (or failed) run leaves for people: summary.json, report.md and the console table."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launcher.config import metric_mode

COLUMNS = (("accuracy", "test accuracy", "{:.4f}"), ("perplexity", "test perplexity", "{:.2f}"), ("params", "params", "{:,}"),
           ("size_bytes", "size (bytes)", "{:,}"), ("latency_ms_b1", "latency b1 (ms)", "{:.3f}"))


def _columns(models: dict) -> list[tuple[str, str, str]]:
    """The columns every model has a number for (perplexity only for language models)."""
    return [c for c in COLUMNS if all(c[0] in m for m in models.values())]


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, run_dir / "summary.json")


def write_report(run_dir: Path, summary: dict) -> None:
    lines = [f"# raylaunch run: {summary['status']}", ""]
    if summary.get("error"):
        lines += [f"Failed in stage `{summary.get('failed_stage')}`: {summary['error']}", ""]
    stages = summary["stages"]
    if stages:
        lines += ["## Stages", "", "| stage | seconds | result |", "|---|---:|---|"]
        lines += [f"| {name} | {s.get('seconds', '')} | {_stage_result(name, s)} |" for name, s in stages.items()]
        lines.append("")
    if summary["models"]:
        columns = _columns(summary["models"])
        lines += ["## Models on the test split", "", "| model | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for name, m in summary["models"].items():
            lines.append(f"| {name} | " + " | ".join(fmt.format(m[key]) for key, _, fmt in columns) + " |")
        lines.append("")
    if "tune" in stages:
        trials = stages["tune"]["trials"]
        keys = [k for k in trials[0] if k != "error"]
        lines += ["## Sweep trials", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(t[k]) for k in keys) + " |" for t in trials]
        lines.append("")
        if stages["tune"].get("plot"):
            lines += [f"![metric against each searched value]({Path(stages['tune']['plot']).relative_to(run_dir)})",
                      "", f"All trials: `{Path(stages['tune']['trials_file']).relative_to(run_dir)}`; "
                      f"{stages['tune']['cpu_hours']:.3f} CPU-hours, {stages['tune']['gpu_hours']:.3f} GPU-hours in all.", ""]
    (run_dir / "report.md").write_text("\n".join(lines))


def _stage_result(name: str, stage: dict) -> str:
    if name in ("train", "distill"):
        quality = (f"val perplexity {stage['val_perplexity']:.2f}" if "val_perplexity" in stage
                   else f"val accuracy {stage['val_accuracy']:.4f}")
        return f"{quality}, ZeRO-{stage['zero_stage']}, {stage['workers']} workers"
    if name == "tune":
        return f"{len(stage['trials'])} trials, best {stage['best_trial']} {stage['best_values']}"
    if name == "preprocess":
        return ", ".join(f"{k} {v:,}" for k, v in stage["rows"].items())
    if name == "quantize":
        return f"{stage['source']} -> {stage['method']}"
    return ""


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(console: Console, summary: dict) -> None:
    if not summary["models"]:
        return
    table = Table(title="Models on the held-out test split")
    table.add_column("model")
    columns = _columns(summary["models"])
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for name, m in summary["models"].items():
        table.add_row(name, *(fmt.format(m[key]) for key, _, fmt in columns))
    console.print(table)


def print_trials(console: Console, trials: list[dict], metric: str, searched: list[str]) -> None:
    """The sweep's trials as a console table, best first."""
    table = Table(title="Sweep trials")
    for title in ("trial", *searched, metric, "epochs", "status", "CPU-h"):
        # The trial id whole (a narrow console would cut every row to the same prefix).
        table.add_column(title, justify="left" if title in ("trial", "status") else "right", no_wrap=title == "trial",
                         min_width=11 if title == "trial" else None)
    sign = -1 if metric_mode(metric) == "max" else 1
    ranked = sorted(trials, key=lambda t: (t[metric] != t[metric], sign * t[metric]))
    for t in ranked:
        short = re.match(r"_trial_([0-9a-f]+_\d+)", t["trial"])
        table.add_row(short.group(1) if short else t["trial"], *(_cell(t[p]) for p in searched),
                      "" if t[metric] != t[metric] else f"{t[metric]:.4f}", str(t["epochs_run"]),
                      t["status"] + (f": {t['error'][:60]}" if t["error"] else ""), f"{t['cpu_hours']:.3f}")
    console.print(table)

