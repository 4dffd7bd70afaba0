"""The `raylaunch` command line: `run`, `plan`, `predict`, `submit`, `status`, `logs`, `stop`,
`config show`, `config reference`.

Exit codes: 0 success, 1 the run failed, 2 bad config or input (one `path: problem` line each).
`submit` exits with the job's outcome: 0 succeeded, the job's own code when it failed (1 or 2), 3
stopped; a cluster it cannot reach or that refuses its token is one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from cluster.jobs import JobError
from launcher import config as configuration
from launcher.errors import failure_line, problem_lines
from runconfig.problems import BadInput
from runconfig.schema import STAGES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylaunch", description="Distributed training pipelines on Ray from one YAML file.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline a config describes")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                     help="override a config field, e.g. --set train.lr=1e-3 (repeatable)")
    run.add_argument("--stages", help=f"comma-separated stages to run, in order ({', '.join(STAGES)}); "
                                      "default: every enabled stage")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in output.dir: finished stages are kept, the unfinished one "
                          "continues from its last checkpoint")
    run.add_argument("--verbose", action="store_true", help="show Ray's, DeepSpeed's and the workers' own logs")

    plan = commands.add_parser("plan", help="show workers, memory per ZeRO stage and the stage a run would use, without training")
    plan.add_argument("config")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    plan.add_argument("--verbose", action="store_true")

    predict = commands.add_parser("predict", help="run an exported model (any folder under RUN_DIR/models/) on raw input")
    predict.add_argument("model_dir", help="a model directory: model.safetensors + model.json")
    predict.add_argument("input", help="a classifier: a CSV, Parquet or JSONL file with the feature columns, an image "
                                       "or a folder of images; a language model: a text file to continue")
    predict.add_argument("--top-k", type=int, default=1, help="classes to show per row, most likely first (default 1)")
    predict.add_argument("--max-new-tokens", type=int, default=64, help="tokens a language model generates (default 64)")
    predict.add_argument("--temperature", type=float, default=0.0,
                         help="a language model samples at this temperature (default 0: greedy, the likeliest token)")
    predict.add_argument("--top-p", type=float, default=1.0,
                         help="with --temperature: sample from the likeliest tokens whose probability reaches this (default 1)")
    predict.add_argument("--seed", type=int, default=0, help="with --temperature: the sampling seed (default 0)")
    predict.add_argument("--output", help="also write the predictions as JSON lines to this file")
    predict.add_argument("--compiled", action="store_true",
                         help="run a static_int8 model's compiled program (model.pt2: machine code, loaded into this "
                              "process; only for models from runs you trust); otherwise its tensors run as the "
                              "reference program")
    predict.add_argument("--verbose", action="store_true", help="show torch's and torchao's own logs")

    submit = commands.add_parser("submit", help="run a config as a Ray job on a running cluster, following it to its end")
    submit.add_argument("config", help="YAML config file; validated here, then uploaded resolved")
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a config field (repeatable)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the job")
    submit.add_argument("--stages", help="as for run")
    submit.add_argument("--resume", action="store_true", help="as for run: continue the run in output.dir")
    submit.add_argument("--verbose", action="store_true", help="the job shows Ray's, DeepSpeed's and the workers' own logs")
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        job = commands.add_parser(name, help=text)
        job.add_argument("job_id", help="the id `raylaunch submit` printed")
        job.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
        if name == "logs":
            job.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    config = commands.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    config.add_parser("reference", help="print the config reference (markdown)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    try:
        if args.command == "config":
            if args.action == "reference":
                from launcher.reference import reference_markdown

                print(reference_markdown())
            else:
                print(configuration.dump_yaml(configuration.load(args.config, args.overrides)), end="")
            return 0
        if args.command == "plan":
            return _plan(args, console)
        if args.command == "predict":
            return _predict(args, console, errors)
        if args.command in ("submit", "status", "logs", "stop"):
            return _job_command(args, console, errors)
        return _run(args, console, errors)
    except (BadInput, JobError) as exc:  # bad config or input from any layer, or a cluster that cannot take a job
        for line in problem_lines(exc) if isinstance(exc, BadInput) else [str(exc)]:
            errors.print(line, markup=False, highlight=False, soft_wrap=True)
        return 2


def _job_command(args, console: Console, errors: Console) -> int:
    from launcher import jobs

    if args.command == "submit":
        return jobs.submit(args.config, args.overrides, args.address, args.no_wait, args.stages, args.resume,
                           args.verbose, console, errors)
    if args.command == "status":
        return jobs.status(args.job_id, args.address, console)
    if args.command == "logs":
        return jobs.logs(args.job_id, args.address, args.follow, console)
    return jobs.stop(args.job_id, args.address, console)


def _run(args, console: Console, errors: Console) -> int:
    from cluster.remote import exists, join

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    from cluster.session import quiet_driver_logs
    from launcher.checks import load_for_run

    quiet_driver_logs(args.verbose)  # the checks may build a transformers model on the meta device

    cfg, stages = load_for_run(args.config, args.overrides, stages, resume=args.resume)
    console.print(f"raylaunch: {args.config} -> {cfg.output.dir}  [dim](stages: {', '.join(stages)})[/]", soft_wrap=True)

    from launcher.pipeline import run_pipeline
    from launcher.report import print_table

    try:
        summary = run_pipeline(cfg, stages, console, verbose=args.verbose, resume=args.resume)
    except BadInput:  # refused after Ray started (a worker group it cannot hold, bad rows): exit 2
        raise
    except KeyboardInterrupt:
        kept = exists(join(cfg.output.dir, "config.yaml"))
        errors.print(f"raylaunch: interrupted; {'continue with --resume' if kept else 'no stage had finished, nothing was kept'}",
                     highlight=False)
        return 130
    except Exception as exc:  # the run failed: one line here, the whole story with --verbose
        if args.verbose:
            errors.print_exception()
        errors.print(f"error: {failure_line(exc)}", markup=False, highlight=False, soft_wrap=True)
        # A run that finished no stage removed its directory: nothing to look at but the trace.
        record = f"see {cfg.output.dir}/summary.json; " if exists(join(cfg.output.dir, "summary.json")) else ""
        errors.print(f"{record}rerun with --verbose for the full trace", markup=False, highlight=False, soft_wrap=True)
        return 1
    print_table(console, summary)
    console.print(f"summary: {cfg.output.dir}/summary.json, report: {cfg.output.dir}/report.html (and report.md), "
                  f"curves: tensorboard --logdir {cfg.output.dir}/tensorboard", soft_wrap=True)
    return 0


def _plan(args, console: Console) -> int:
    from cluster.session import ray_session
    from launcher.plan import check_plan, make_plan, print_plan

    cfg = configuration.load(args.config, args.overrides)
    with ray_session(cfg.cluster.address, cfg.cluster.num_cpus, args.verbose) as resources:
        plan = make_plan(cfg, resources)
    print_plan(console, cfg, plan)
    check_plan(plan)  # a model that cannot fit: the same error `run` would give, exit 2
    return 0


def _predict(args, console: Console, errors: Console) -> int:
    import json
    import logging

    if not args.verbose:  # torchao logs each optional kernel library it cannot load
        for name in ("torchao", "torch.utils._pytree", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers' weight-loading bars and warnings (it reads these when imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from rich.table import Table

    from dataprep import DataError
    from trainers.modeldir import load_model, read_spec
    from trainers.predict import classify, decode, generate, read_inputs

    if args.top_k < 1 or args.max_new_tokens < 1:
        raise DataError(["--top-k and --max-new-tokens: at least 1"])
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DataError(["--temperature: 0 (greedy) or more; --top-p: above 0, at most 1"])
    spec = read_spec(args.model_dir)
    inputs, names = read_inputs(spec, args.input)
    model, spec = load_model(args.model_dir, compiled=args.compiled)
    if spec["preprocess"]["task"] == "lm":
        text = decode(spec, generate(model, spec, inputs, args.max_new_tokens, args.temperature, args.top_p, args.seed))
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        records = [{"input": names[0], "generated": text}]
    else:
        predictions = classify(model, inputs, spec["classes"], args.top_k)
        table = Table(title=f"{Path(args.model_dir).name}: {len(names)} prediction(s)")
        table.add_column("input")
        table.add_column("prediction" if args.top_k == 1 else f"top {args.top_k} (probability)")
        for name, top in zip(names, predictions):
            table.add_row(name, ", ".join(f"{c} ({p:.3f})" for c, p in top))
        console.print(table)
        records = [{"input": n, "class": top[0][0], "probability": top[0][1], "top": [list(t) for t in top]}
                   for n, top in zip(names, predictions)]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
