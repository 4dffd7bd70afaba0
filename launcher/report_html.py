"""report.html: one self-contained page (its charts embedded as PNG data) with the stage results,
the teacher's and student's training curves, the sweep's trials and the compression table."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from launcher.live import METRICS_DIR

CURVES = "training_curves.png"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; } img { max-width: 100%; border: 1px solid #eee; } .failed { color: #b00; } .ok { color: #070; } .note { color: #666; }
"""


EVENT_HEADER = ["stage", "event", "at step", "workers", "steps lost", "note"]
"""The columns of the table of worker-group events (launcher.report.event_rows)."""


def write_html(run_dir: Path, summary: dict, stage_rows: list[list], model_header: list[str],
               model_rows: list[list], notes: list[str] = (), event_rows: list[list] = ()) -> Path:
    """Write run_dir/report.html; the stage and model tables come formatted as in report.md, with
    the `notes` below the models (what ran for each)."""
    stages = summary["stages"]
    status = summary["status"]
    parts = [f"<h1>raylaunch run: <span class='{'ok' if status == 'succeeded' else 'failed'}'>{_e(status)}</span></h1>",
             f"<p class='note'>{_e(str(run_dir))}</p>"]
    if summary.get("error"):
        parts.append(f"<p class='failed'>Failed in stage <code>{_e(summary.get('failed_stage'))}</code>: {_e(summary['error'])}</p>")
    if stages:
        parts.append("<h2>Stages</h2>")
        parts.append(_table(["stage", "seconds", "result"], stage_rows))
    if event_rows:
        parts += ["<h2>Worker group events</h2>", _table(EVENT_HEADER, event_rows)]
    curves = _curves(run_dir, summary)
    if curves:
        parts += ["<h2>Training curves</h2>", _img(run_dir / curves, "training loss per step and validation metric per epoch")]
    if "tune" in stages:
        trials = stages["tune"]["trials"]
        keys = [k for k in trials[0] if k != "error"]
        parts += ["<h2>Sweep trials</h2>",
                  f"<p>Best: <code>{_e(short_trial(stages['tune']['best_trial']))}</code> with "
                  f"{_e(stages['tune']['best_values'])}; "
                  f"{stages['tune']['cpu_hours']:.3f} CPU-hours, {stages['tune']['gpu_hours']:.3f} GPU-hours in all.</p>",
                  _table(keys, [[short_trial(t[k]) if k == "trial" else t[k] for k in keys] for t in trials])]
        if stages["tune"].get("plot") and Path(stages["tune"]["plot"]).exists():
            parts.append(_img(Path(stages["tune"]["plot"]), "the metric against each searched value"))
    if summary["models"]:
        parts.append("<h2>Models on the test split</h2>")
        parts.append(_table(model_header, model_rows))
        for method, reason in stages.get("quantize", {}).get("skipped", {}).items():
            parts.append(f"<p class='note'>Not quantized with {_e(method)}: {_e(reason)}</p>")
        parts += [f"<p class='note'>{_e(line)}</p>" for line in notes]
        if (run_dir / "models.png").exists():
            parts.append(_img(run_dir / "models.png", "quality, size, latency and throughput per model"))
    page = ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>raylaunch report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    target = run_dir / "report.html"
    target.write_text(page)
    return target


def short_trial(name: str) -> str:
    """A trial's id as the console shows it (`82686_00000`), from Ray Tune's folder name for it
    (`_trial_82686_00000_0_model_width=64,...`, which trials.parquet keeps)."""
    short = re.match(r"_trial_([0-9a-f]+_\d+)", name)
    return short.group(1) if short else name


def _curves(run_dir: Path, summary: dict) -> str | None:
    """training_curves.png: the loss per optimizer step and the validation metric per report of
    the teacher and the student (from metrics/<role>.jsonl), and of every sweep trial."""
    histories = {role: _read(run_dir / METRICS_DIR / f"{role}.jsonl") for role in ("teacher", "student")}
    trials = sorted((run_dir / METRICS_DIR).glob("trial-*.jsonl")) if (run_dir / METRICS_DIR).is_dir() else []
    # A sweep's teacher is its best trial: its curve is drawn as the teacher's.
    best = summary["stages"].get("tune", {}).get("best_trial", "")
    role = summary["stages"].get("tune", {}).get("role", "teacher")
    histories |= {f"{role} ({path.stem})" if path.stem[len("trial-"):] in best else path.stem: _read(path) for path in trials}
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "val_perplexity" if any("val_perplexity" in r for h in histories.values() for r in h) else "val_accuracy"
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, reports in histories.items():
        trial = name.startswith("trial-")
        style = {"linewidth": 0.8, "alpha": 0.6} if trial else {"linewidth": 1.6}
        steps = [row for r in reports for row in r.get("step_log") or []]
        if steps:
            loss_ax.plot([s for s, _, _ in steps], [loss for _, loss, _ in steps], label=name, **style)
        scored = [(r["epoch"], r[metric]) for r in reports if metric in r and "epoch" in r]
        if scored:
            metric_ax.plot(*zip(*scored), marker="." if trial else "o", label=name, **style)
    loss_ax.set(title="training loss per step (rank 0)", xlabel="optimizer step", ylabel="loss")
    metric_ax.set(title=f"{metric.replace('_', ' ')} per report", xlabel="epoch", ylabel=metric)
    for ax in (loss_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / CURVES, dpi=100)
    plt.close(fig)
    return CURVES


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<p><img alt='{_e(alt)}' src='data:image/png;base64,{data}'></p>"


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _td(value) -> str:
    if isinstance(value, float):
        return f"<td class='n'>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td class='n'>{value:,}</td>"
    return f"<td>{_e(value)}</td>"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
