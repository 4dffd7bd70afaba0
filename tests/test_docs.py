"""The documentation is checked like code: the site builds in strict mode, the shell blocks marked
runnable run, each error the troubleshooting page shows is the one raylaunch prints, every
`raylaunch` command in the docs parses and every YAML block is a config the schema accepts, the
reference is the schema's, and the README stays a short front door."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from launcher.reference import BEGIN, END, reference_markdown

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str
    marker: str | None  # the `<!-- name -->` comment on the line before the fence, if any

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"\s*(```+)\s*(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = re.fullmatch(r"<!--\s*([\w-]+)\s*-->", before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1))
        found.append(Block(page, i + 1, fence.group(2), "\n".join(lines[i + 1:end]), marker and marker.group(1)))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
SHELL = [b for b in ALL if b.lang in ("sh", "bash")]
RUNNABLE = [b for b in SHELL if b.marker == "runnable"]
ERRORS = [(b, ALL[ALL.index(b) + 1]) for b in SHELL if b.marker == "error"]


def _scratch(tmp_path: Path) -> dict:
    """A directory to run the docs' commands in, as from the checkout (its `configs/`, and
    `.venv/bin` this Python's), and their environment: an embedded Ray of their own, as a user's."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(BIN)
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    return env


def _shell(block: Block, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", block.text], cwd=tmp_path, env=_scratch(tmp_path),
                          capture_output=True, text=True, timeout=300)


def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link or anchor, a page left out of the navigation or a missing snippet fails."""
    site = tmp_path / "site"
    built = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    # The pages that include other files show them: the benchmarks table, the quickstart's output.
    assert "bench/first_step.py" in (site / "benchmarks" / "index.html").read_text()
    assert "✓ evaluate" in (site / "getting-started" / "index.html").read_text()


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_a_runnable_shell_block_runs(block, tmp_path):
    done = _shell(block, tmp_path)
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("block,expected", ERRORS, ids=[b.id for b, _ in ERRORS])
def test_an_error_the_docs_show_is_the_one_raylaunch_prints(block, expected, tmp_path):
    done = _shell(block, tmp_path)
    printed = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, f"{block.id} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert " ".join(expected.text.split()) in printed, f"{block.id} printed:\n{done.stdout}\n{done.stderr}"
    assert not (tmp_path / "runs" / "quickstart").exists(), "a refused run left its output.dir behind"


def _commands(block: Block) -> list[list[str]]:
    """Each raylaunch command of a shell block, as its arguments (`raylaunch` or `python -m launcher`)."""
    found = []
    for line in block.text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # `#` starts a comment
        lexer.whitespace_split = True  # words break at spaces and operators only
        tokens, words = list(lexer), []
        for token in [*tokens, ";"]:
            if token not in ("&&", "||", ";", "|", "(", ")", "$", "&"):
                words.append(token)
                continue
            if words and Path(words[0]).name == "raylaunch":
                found.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["launcher"]:
                found.append(words[words.index("-m") + 2:])
            words = []
    return found


COMMANDS = [(b, c) for b in SHELL for c in _commands(b)]


def test_the_docs_show_raylaunch_commands():
    assert len(COMMANDS) >= 20 and len(RUNNABLE) >= 2 and len(ERRORS) >= 8


@pytest.mark.parametrize("block,args", COMMANDS, ids=[f"{b.id}:{' '.join(c[:2])}" for b, c in COMMANDS])
def test_every_raylaunch_command_in_the_docs_parses_and_its_config_loads(block, args):
    """A renamed flag, subcommand or config field fails here, run or not."""
    from launcher.cli import _parser
    from launcher.config import load

    try:
        parsed = _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{block.id}: raylaunch {shlex.join(args)} does not parse")
    config = getattr(parsed, "config", None)
    if block.marker != "error" and config and (ROOT / config).is_file():
        load(ROOT / config, parsed.overrides)  # a ConfigError names the problem


YAML = [b for b in ALL if b.lang == "yaml" and b.marker != "not-a-config"]


@pytest.mark.parametrize("block", YAML, ids=[b.id for b in YAML])
def test_every_yaml_block_in_the_docs_is_a_valid_config(block):
    from launcher.config import validate

    validate(yaml.safe_load(block.text))


def test_the_config_reference_matches_the_schema():
    text = (DOCS / "reference.md").read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == reference_markdown(), "regenerate it: python -c 'from launcher.reference import write_reference; write_reference()'"


def test_the_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) < 150
    assert "make quickstart" in text[:800] and "make test" in text[:800]
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)  # relative links and images
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]
    output = text[text.index("[start:quickstart-output]"):text.index("[end:quickstart-output]")]
    assert all(f"✓ {stage}" in output for stage in ("preprocess", "tune", "distill", "quantize", "evaluate"))
