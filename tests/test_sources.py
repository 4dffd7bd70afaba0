"""Listing `data.source`: files, folders and globs, as local paths or as URIs, give the same files
and the same paths relative to their roots (the split of an image depends on that path). No Ray."""

from __future__ import annotations

import pytest

from dataprep import DataError
from dataprep.sources import list_files


@pytest.fixture
def tree(tmp_path):
    for name in ("2025/a.parquet", "2025/b.parquet", "2026/c.parquet", "2026/notes.txt", "top.parquet", "2026/.hidden.parquet",
                 "2026/_SUCCESS"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("source, expected", [
    ("{root}", ["2025/a.parquet", "2025/b.parquet", "2026/c.parquet", "top.parquet"]),
    ("{root}/*.parquet", ["top.parquet"]),
    ("{root}/**/*.parquet", ["2025/a.parquet", "2025/b.parquet", "2026/c.parquet", "top.parquet"]),
    ("{root}/202?", ["2025/a.parquet", "2025/b.parquet", "2026/c.parquet"]),
    ("{root}/2026/c.parquet", ["c.parquet"]),
])
def test_local_paths_and_file_uris_list_the_same_files(tree, source, expected):
    local = list_files([source.format(root=tree)], extensions=(".parquet",))
    uri = list_files([source.format(root=f"file://{tree}")], extensions=(".parquet",))
    assert [local.relative(p) for p in local.paths] == expected
    assert [uri.relative(p) for p in uri.paths] == expected and uri.paths == local.paths


@pytest.mark.parametrize("source", ["{root}/*.csv", "file://{root}/*.csv", "{root}/missing", "file://{root}/missing"])
def test_nothing_matched_is_a_data_error_naming_the_source(tree, source):
    with pytest.raises(DataError, match="data.source: .*"):
        list_files([source.format(root=tree)], extensions=(".parquet",))


def test_text_glob_character_classes_match_as_glob_does(tmp_path):
    import fnmatch

    from dataprep.sources import glob_regex, list_files

    for pattern, names in [("[a-c]*.py", ["abc.py", "b.py", "d.py", "c"]), ("[!a]*.py", ["b.py", "a.py"]),
                           ("x[.py", ["x[.py", "x.py"]), ("[]a]?", ["]b", "ab", "zz"]), ("[\\^]x", ["^x", "\\x", "ax"])]:
        for name in names:
            assert bool(glob_regex(pattern).fullmatch(name)) == fnmatch.fnmatchcase(name, pattern), (pattern, name)
    assert not glob_regex("[!a]*.py").fullmatch("sub/b.py") and not glob_regex("[a-z/]x").fullmatch("/x")
    for name in ("pathlib.py", "pdb.py", "ast.py", "pkg/pickle.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    found = list_files([str(tmp_path)], "[p-q]*.py").paths
    assert [p.rsplit("/", 1)[-1] for p in found] == ["pathlib.py", "pdb.py"]
