"""What a finished (or failed) run leaves for people: summary.json, report.md and the console table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from runconfig.schema import RunConfig, metric_mode

COLUMNS = (("accuracy", "test accuracy", "{:.4f}".format), ("perplexity", "test perplexity", "{:.2f}".format),
           ("params", "params", "{:,}".format), ("size_bytes", "KiB", lambda b: f"{b / 1024:.1f}"),
           ("latency_ms_p50", "b1 p50 ms", "{:.3f}".format), ("latency_ms_p95", "b1 p95 ms", "{:.3f}".format),
           ("rows_per_s_b64", "b64 rows/s", "{:,.0f}".format),
           ("gen_tokens_per_s_b1", "generated tok/s b1", "{:,.0f}".format),
           ("gen_tokens_per_s_b8", "generated tok/s b8", "{:,.0f}".format), ("status", "gate", str))
# The console's narrower version (an 80-column terminal holds it): (key, title, format).
CONSOLE_COLUMNS = (("accuracy", "acc", "{:.4f}".format), ("perplexity", "ppl", "{:.2f}".format),
                   ("params", "params", lambda n: _compact(n)), ("size_bytes", "KiB", lambda b: f"{b / 1024:.1f}"),
                   ("latency_ms_p50", "p50 ms", "{:.3f}".format), ("latency_ms_p95", "p95 ms", "{:.3f}".format),
                   ("rows_per_s_b64", "b64/s", lambda r: _compact(r)),
                   ("gen_tokens_per_s_b1", "gen1/s", lambda r: _compact(r)),
                   ("gen_tokens_per_s_b8", "gen8/s", lambda r: _compact(r)),
                   ("status", "gate", lambda s: "ok" if s == "accepted" else s))
# A language model's console table shows generation speed in place of these (the report keeps all).
CONSOLE_ONLY_CLASSIFIERS = ("latency_ms_p50", "latency_ms_p95", "rows_per_s_b64")
CHART = "models.png"


def stage_line(name: str, result: dict, summary: dict, cfg: RunConfig) -> str:
    """The console's one line for a finished stage, from what the summary keeps of it."""
    if name == "preprocess":
        rows, cache = result["rows"], result["cache"]
        how = f"reused cached {cache['key']}" if cache["reused"] else f"cached as {cache['key']}"
        splits = f"train {rows['train']:,} / val {rows['val']:,} / test {rows['test']:,}"
        bad = result["bad_rows"]
        dropped = f", {sum(b['rows'] for b in bad.values()):,} bad rows skipped in {len(bad)} file(s)" if bad else ""
        if "packed" in result:
            each = "examples packed, each attending to itself" if result["packed"] else "an example each"
            return (f"{result['files']:,} files of instructions -> rows of {result['seq_len']} tokens ({each}; loss on "
                    f"the responses): {splits} ({how}{dropped})")
        if "tokens" in result:
            tokens = ("tokens of the model's tokenizer" if result["tokenizer"] == "model"
                      else f"{result['tokenizer']} tokens")
            return (f"{result['files']:,} files -> {sum(result['tokens'].values()):,} {tokens} in "
                    f"blocks of {result['seq_len']}: {splits} ({how}{dropped})")
        return f"{sum(rows.values()):,} rows, {result['num_classes']} classes -> {splits} ({how}{dropped})"
    if name in ("train", "distill"):
        role = "teacher" if name == "train" else "student"
        where = f"ZeRO-{result['zero_stage']} on {result['workers']} workers"
        if "tokens_per_s" in result:
            return (f"{role}: val perplexity {result['val_perplexity']:.2f}, next-token accuracy "
                    f"{result['val_accuracy']:.4f} (best at step {result['step']}), {where}, "
                    f"{result['tokens_per_s']:,.0f} tokens/s")
        return (f"{role}: val accuracy {result['val_accuracy']:.4f} (best epoch {result['epoch']:g}), {where}, "
                f"{result['samples_per_s']:.0f} samples/s")
    if name == "tune":
        trials, metric, scheduler = result["trials"], cfg.tune.metric, cfg.tune.scheduler
        failed = sum(t["status"] == "error" for t in trials)
        if scheduler == "pbt":
            moved = f"{sum(bool(t.get('continued_from')) for t in trials)} continued from other trials' checkpoints by pbt"
        else:
            moved = f"{sum(t['status'] == 'stopped early' for t in trials)} stopped early by {scheduler}"
        values = ", ".join(f"{k}={_short(v)}" for k, v in result["best_values"].items())
        return (f"{len(trials)} {result['role']} trials ({moved}, {failed} failed); "
                f"best {metric} {result['best_metrics'][metric]:.4f} with {values}")
    if name == "quantize":
        (quality, value), = result["baseline"].items()
        parts = [f"{n} {m[quality]:.4f}" for n, m in result["models"].items()] + [f"{m} skipped" for m in result["skipped"]]
        return f"{result['source']} (test {quality} {value:.4f}) -> " + ", ".join(parts)
    models = summary["models"]  # evaluate
    key = "perplexity" if all("perplexity" in m for m in models.values()) else "accuracy"
    return f"test {key} " + ", ".join(f"{n} {m[key]:.4f}" for n, m in models.items())


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _compact(number: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= limit:
            return f"{number / limit:.1f}{suffix}"
    return f"{number:.0f}"


def _columns(models: dict, columns=COLUMNS) -> list[tuple]:
    """The columns some model has a value for (perplexity only for language models, the gate only
    for quantized models)."""
    return [c for c in columns if any(c[0] in m for m in models.values())]


def _row(model: dict, columns) -> list[str]:
    return [fmt(model[key]) if key in model else "" for key, _, fmt in columns]


def _chart(run_dir: Path, models: dict) -> str | None:
    """Bar charts of quality, size and batch-1 latency per model, side by side (models.png)."""
    if not all("latency_ms_p50" in m for m in models.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = "perplexity" if all("perplexity" in m for m in models.values()) else "accuracy"
    panels = ((quality, f"test {quality}"), ("size_bytes", "file size (KiB)"), ("latency_ms_p50", "batch-1 latency p50 (ms)"),
              ("rows_per_s_b64", "batch-64 throughput (rows/s)"))
    names = list(models)
    # fp32 models blue; quantized ones (those the gate judged) green, or red when rejected
    colors = [{"rejected": "tab:red", "accepted": "tab:green"}.get(models[n].get("status"), "tab:blue") for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        values = [models[n][key] / (1024 if key == "size_bytes" else 1) for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        if key == "accuracy":
            ax.set_ylim(max(0.0, min(values) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(run_dir / CHART, dpi=100)
    plt.close(fig)
    return CHART


def _programs(models: dict) -> list[str]:
    """What the latency and throughput columns measured for models that are not eager PyTorch."""
    lines = []
    for name, model in models.items():
        program = model.get("program")
        if program and program.endswith(".pt2"):
            lines.append(f"{name} ran its AOTInductor-compiled program ({program}, "
                         f"{model['program_bytes'] / 2**20:.1f} MiB of machine code and weights beside the {model['size_bytes'] / 1024:.1f} KiB weights file); "
                         f"the models without one ran eagerly.")
        elif program:
            lines.append(f"{name} ran {program}.")
    return lines


def write_summary(run_dir: Path, summary: dict) -> None:
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, run_dir / "summary.json")


def write_report(run_dir: Path, summary: dict) -> list[Path]:
    """Write report.md and report.html (with their charts); returns the two."""
    from launcher.report_html import CURVES, write_html

    lines = [f"# raylaunch run: {summary['status']}", ""]
    if summary.get("error"):
        lines += [f"Failed in stage `{summary.get('failed_stage')}`: {summary['error']}", ""]
    stages = summary["stages"]
    if stages:
        lines += ["## Stages", "", "| stage | seconds | result |", "|---|---:|---|"]
        lines += [f"| {name} | {s.get('seconds', '')} | {_stage_result(name, s)} |" for name, s in stages.items()]
        lines.append("")
    stage_rows = [[name, s.get("seconds", ""), _stage_result(name, s)] for name, s in stages.items()]
    from launcher.report_html import EVENT_HEADER

    events = event_rows(stages)
    if events:
        lines += ["## Worker group events", "", "| " + " | ".join(EVENT_HEADER) + " |", "|" + "---|" * len(EVENT_HEADER)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in events]
        lines.append("")
    model_header, model_rows = ["model"], []
    if summary["models"]:
        columns = _columns(summary["models"])
        lines += ["## Models on the test split", "", "| model | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        model_header += [title for _, title, _ in columns]
        model_rows = [[name, *_row(m, columns)] for name, m in summary["models"].items()]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, *cells in model_rows]
        lines.append("")
        skipped = stages.get("quantize", {}).get("skipped", {})
        lines += [f"Not quantized with {method}: {reason}" for method, reason in skipped.items()]
        lines += [""] if skipped else []
        programs = _programs(summary["models"])
        lines += programs + [""] if programs else []
        chart = _chart(run_dir, summary["models"])
        if chart:
            lines += [f"![quality, size, latency and throughput per model]({chart})", ""]
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
    # draws the curves too
    page = write_html(run_dir, summary, stage_rows, model_header, model_rows, _programs(summary["models"]), events)
    if (run_dir / CURVES).exists():
        lines += ["## Training curves", "", f"![training loss per step, validation metric per report]({CURVES})", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return [run_dir / "report.md", page]


def event_rows(stages: dict) -> list[list]:
    """One row per restore, resize and preemption of a training stage's worker group."""
    rows = []
    for name, stage in stages.items():
        for event in stage.get("events", []) if isinstance(stage, dict) else []:
            lost = event.get("lost_steps")
            where = f"trial {event['trial']}: " if "trial" in event else ""
            if event["kind"] == "preemption":
                note = f"rank(s) {event['ranks']} noticed" + ("" if event["seconds_left"] is None
                                                              else f", {event['seconds_left']} s before the deadline")
                rows.append([name, "preemption checkpoint", event["step"], "", "", where + note])
            else:
                rows.append([name, event["kind"], event["step"], event["workers"], "unknown" if lost is None else lost,
                             where + "continued from the checkpoint at this step"])
    return rows


def _stage_result(name: str, stage: dict) -> str:
    if name in ("train", "distill"):
        quality = (f"val perplexity {stage['val_perplexity']:.2f}" if "val_perplexity" in stage
                   else f"val accuracy {stage['val_accuracy']:.4f}")
        return f"{quality}, ZeRO-{stage['zero_stage']}, {stage['workers']} workers"
    if name == "tune":
        from launcher.report_html import short_trial

        return f"{len(stage['trials'])} trials, best {short_trial(stage['best_trial'])} {stage['best_values']}"
    if name == "preprocess":
        return ", ".join(f"{k} {v:,}" for k, v in stage["rows"].items())
    if name == "quantize":
        return f"{stage['source']} -> {', '.join(m['method'] for m in stage['models'].values())}"
    return ""


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(console: Console, summary: dict) -> None:
    models = summary["models"]
    if not models:
        return
    columns = _columns(models, CONSOLE_COLUMNS)
    if any("gen_tokens_per_s_b1" in m for m in models.values()):  # an 80-column terminal holds it
        columns = [c for c in columns if c[0] not in CONSOLE_ONLY_CLASSIFIERS]
    rows = [[name, *_row(m, columns)] for name, m in models.items()]
    titles = ["model", *(title for _, title, _ in columns)]
    table = Table(title="Models on the held-out test split", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  collapse_padding=True, show_edge=False)
    for i, title in enumerate(titles):
        # Each column as wide as its widest cell: rich would otherwise cut numbers to "0.8…".
        table.add_column(title, justify="left" if i == 0 else "right", no_wrap=True,
                         min_width=max(len(title), *(len(r[i]) for r in rows)))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in _programs(models):
        console.print(line, markup=False, highlight=False)


def print_trials(console: Console, trials: list[dict], metric: str, searched: list[str]) -> None:
    """The sweep's trials as a console table, best first."""
    from launcher.report_html import short_trial

    table = Table(title="Sweep trials")
    for title in ("trial", *searched, metric, "epochs", "status", "CPU-h"):
        # The trial id whole (a narrow console would cut every row to the same prefix).
        table.add_column(title, justify="left" if title in ("trial", "status") else "right", no_wrap=title == "trial",
                         min_width=11 if title == "trial" else None)
    sign = -1 if metric_mode(metric) == "max" else 1
    ranked = sorted(trials, key=lambda t: (t[metric] != t[metric], sign * t[metric]))
    for t in ranked:
        table.add_row(short_trial(t["trial"]), *(_cell(t[p]) for p in searched),
                      "" if t[metric] != t[metric] else f"{t[metric]:.4f}", str(t["epochs_run"]),
                      t["status"] + (f": {t['error'][:60]}" if t["error"] else ""), f"{t['cpu_hours']:.3f}")
    console.print(table)

