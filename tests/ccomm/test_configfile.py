"""ccomm.configfile: config mistakes as `file:line: message`, output directories checked first."""
from __future__ import annotations

from pathlib import Path

import pytest

from ccomm.configfile import ConfigFileError, load_mapping, writable_dir


@pytest.mark.parametrize(
    "name, text, expect",
    [
        ("syntax.yaml", "a: 1\nb: [1, 2\nc: 3\n", r"syntax\.yaml:\d+: invalid YAML: "),
        ("tabs.yaml", "a: 1\n\tb: 2\n", r"tabs\.yaml:2: invalid YAML"),
        ("empty.yaml", "", r"empty\.yaml:1: the config file is empty; expected a mapping"),
        ("comments.yaml", "# only a comment\n", r"comments\.yaml:1: the config file is empty"),
        ("list.yaml", "- a\n- b\n", r"list\.yaml:1: the config file must hold a mapping of keys, got a list"),
        ("scalar.yaml", "42\n", r"must hold a mapping of keys, got a int"),
        ("bad.json", '{"a": 1,\n "b": }\n', r"bad\.json:2: invalid JSON: "),
        ("list.json", "[1, 2]", r"list\.json:1: .* got a list"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, text: str, expect: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigFileError, match=expect):
        load_mapping(p)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"no such file \(the results file\)"):
        load_mapping(tmp_path / "nope.json", "results")
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_mapping(tmp_path)


def test_good_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: 1\nb: {c: [1, 2]}\n")
    (tmp_path / "a.json").write_text('{"a": 1}')
    assert load_mapping(tmp_path / "a.yaml") == {"a": 1, "b": {"c": [1, 2]}}
    assert load_mapping(tmp_path / "a.json") == {"a": 1}


def test_writable_dir(tmp_path: Path) -> None:
    assert writable_dir(tmp_path / "x" / "y").is_dir()
    assert list((tmp_path / "x" / "y").iterdir()) == []  # the probe file is gone
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigFileError, match=r"--out '.*file/sub': not a writable directory"):
        writable_dir(f / "sub")
