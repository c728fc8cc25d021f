"""`python -m ccomm.bench --NAME`: benchmark plugins found through entry points, not imports.

ccomm sits below netsim and must not import it; the collectives benchmark (netsim's) reaches
`python -m ccomm.bench --collectives` as an entry point of the group ``ccomm.bench``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from ccomm import bench

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_registers_the_collectives_plugin() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["entry-points"][bench.PLUGIN_GROUP]["collectives"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), target


def _install_fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{bench.PLUGIN_GROUP}]\nfake = fakeplug_mod:main\n")
    (tmp_path / "fakeplug_mod.py").write_text(
        "SEEN = []\n\ndef main(argv):\n    SEEN.append(list(argv))\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_main_runs_an_installed_plugin_with_the_remaining_arguments(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_plugin(tmp_path, monkeypatch)
    assert "fake" in bench.plugins()
    assert bench.main(["--x", "1", "--fake", "--y"]) == 7
    assert sys.modules["fakeplug_mod"].SEEN == [["--x", "1", "--y"]]


def test_a_known_plugin_that_is_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "plugins", lambda: {})
    assert bench.main(["--collectives", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--collectives" in err and "ccomm.bench" in err and "pip install -e ." in err
