from pathlib import Path

from launcher.reference import BEGIN, END, reference_markdown

README = Path(__file__).parent.parent / "README.md"


def test_readme_config_reference_matches_the_schema():
    text = README.read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == reference_markdown(), "regenerate with: raylaunch config reference"


def test_readme_starts_with_the_two_commands():
    head = README.read_text()[:800]
    assert "make quickstart" in head and "make test" in head
