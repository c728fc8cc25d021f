"""`deco_sgd.bench.provenance`: the digest follows the code a run executes, and only that."""
from __future__ import annotations

from pathlib import Path

from deco_sgd.bench.provenance import EXCLUDED, PACKAGES, code_digest, describe, source_files, summarize


def _tree(root: Path) -> None:
    for pkg in PACKAGES:
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text(f"# {pkg}\n")
    (root / "deco_sgd" / "bench").mkdir()
    (root / "deco_sgd" / "bench" / "report.py").write_text("x = 1\n")
    (root / "deco_sgd" / "controller.py").write_text("W = 1\n")


def test_digest_sees_executed_sources_only(tmp_path: Path) -> None:
    _tree(tmp_path)
    base = code_digest(tmp_path)
    assert "deco_sgd/bench/report.py" in EXCLUDED
    assert [p.relative_to(tmp_path).as_posix() for p in source_files(tmp_path)] == [
        "ccomm/__init__.py", "netsim/__init__.py", "deco_sgd/__init__.py", "deco_sgd/controller.py"]
    (tmp_path / "deco_sgd" / "bench" / "report.py").write_text("x = 2\n")  # presentation only
    (tmp_path / "deco_sgd" / "notes.txt").write_text("not Python\n")
    code_digest.cache_clear()
    assert code_digest(tmp_path) == base
    (tmp_path / "deco_sgd" / "controller.py").write_text("W = 2\n")  # the controller changed
    code_digest.cache_clear()
    assert code_digest(tmp_path) != base


def test_summary_names_the_runs_from_other_code() -> None:
    recs = [{"name": "dsgd", "seed": 0, "code": "a"}, {"name": "deco", "seed": 0, "code": "b"},
            {"name": "dsgd", "seed": 1}, {"name": "static_d0.01_t2", "seed": 0, "code": "c"}]
    s = summarize(recs, "b")
    assert s == {"code": "b", "runs": 4, "other_code": {"a": ["dsgd:s0"], "unknown": ["dsgd:s1"],
                                                           "c": ["static_d0.01_t2:s0"]}}
    (line,) = describe(s)
    assert line.startswith("Code: digest b (`deco_sgd.bench.provenance`); 1 of 4 runs were trained by it; ")
    assert "unknown (1 runs: dsgd:s1)" in line
    assert describe(summarize(recs[1:2], "b")) == [
        "Code: digest b (`deco_sgd.bench.provenance`); 1 of 1 runs were trained by it."]
