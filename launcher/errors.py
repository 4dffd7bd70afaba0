"""How an error reaches the user: bad config or input (`BadInput`, from any layer) as one line per
problem and exit 2; a failed run as one line naming the innermost error and exit 1."""

from __future__ import annotations

import re

from cluster.session import stop_signal
from runconfig.problems import BadInput


def problem_lines(exc: BadInput) -> list[str]:
    """One line a problem, whatever a library's message embedded in it holds (pyarrow's end in newlines)."""
    return [" ".join(problem.split()).replace("( ", "(").replace(" )", ")") for problem in exc.problems]


def failure_line(exc: BaseException) -> str:
    """One line saying why a run failed: the innermost error of a worker's traceback, which Ray
    wraps (WorkerGroupError, TrainingFailedError) with the whole remote traceback above it."""
    if isinstance(exc, KeyboardInterrupt):
        return f"stopped by {stop_signal()}" if stop_signal() else "interrupted"
    if isinstance(exc, BadInput):
        return "; ".join(problem_lines(exc))
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", lines[-1]) else f"{type(exc).__name__}: {lines[-1]}"
