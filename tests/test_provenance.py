"""liftquant.util.provenance (commit, dirty flag, source hash, match) and liftquant.util.records (merged
benchmark rows that keep other commits' measurements)."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from liftquant.util import provenance as prov
from liftquant.util.records import merge_csv_rows, merge_json_rows

ROOT = Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A small git repository laid out like this one."""
    root = tmp_path / "repo"
    for rel, text in {"liftquant/__init__.py": "", "liftquant/kernels/k.py": "K = 1\n",
                      "main.py": "print(1)\n", "scripts/bench_x.py": "X = 1\n",
                      "lattice/8to4.pt": "M", "README.md": "docs\n",
                      "bench/x.csv": "a\n1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root.parent, "init", "-q", str(root))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "first")
    return root


def test_commit_and_dirty_flag(repo, monkeypatch):
    monkeypatch.setenv("LQ_COMMIT", "handset")  # no override variable any more
    state = prov.git_state(repo)
    assert state["commit"] == _git(repo, "rev-parse", "HEAD") and len(state["commit"]) == 40
    assert state["commit"].startswith(state["commit_short"]) and state["dirty"] is False
    (repo / "new_untracked.py").write_text("")  # untracked files do not make the tree dirty
    assert prov.git_state(repo)["dirty"] is False
    (repo / "README.md").write_text("edited\n")
    assert prov.git_state(repo)["dirty"] is True
    copy = shutil.copytree(repo, repo.parent / "copy", ignore=shutil.ignore_patterns(".git"))
    assert prov.git_state(copy) == {"commit": "unknown", "commit_short": "unknown",
                                    "dirty": None}
    assert prov.source_sha256(copy) == prov.source_sha256(repo)  # verifiable without .git


def test_source_hash_is_stable_and_tracks_source_files_only(repo):
    first = prov.source_sha256(repo)
    assert first == prov.source_sha256(repo) == prov.commit_source_sha256("HEAD", root=repo)
    assert prov.source_files(repo) == ["lattice/8to4.pt", "liftquant/__init__.py",
                                       "liftquant/kernels/k.py", "main.py", "scripts/bench_x.py"]
    (repo / "README.md").write_text("edited\n")
    (repo / "bench" / "x.csv").write_text("b\n")
    (repo / "liftquant" / "__pycache__").mkdir()
    (repo / "liftquant" / "__pycache__" / "k.py").write_text("cache")
    assert prov.source_sha256(repo) == first
    (repo / "liftquant" / "kernels" / "k.py").write_text("K = 2\n")
    second = prov.source_sha256(repo)
    assert second != first
    assert prov.match_commit(second, root=repo) is None  # edits not committed: unknown
    _git(repo, "commit", "-qam", "second")
    assert prov.match_commit(second[:12], root=repo) == _git(repo, "rev-parse", "HEAD")
    assert prov.match_commit(first, root=repo) == _git(repo, "rev-parse", "HEAD~1")
    with pytest.raises(ValueError, match="8 hex"):
        prov.match_commit("abc", root=repo)


def test_match_command_line(repo, capsys):
    h = prov.source_sha256(repo)
    assert prov.main(["match", "--repo", str(repo), h]) == 0
    assert capsys.readouterr().out.strip() == _git(repo, "rev-parse", "HEAD")
    assert prov.main(["match", "--repo", str(repo), "0" * 16]) == 1
    assert "dirty/unknown" in capsys.readouterr().out


def test_provenance_fields():
    p = prov.provenance()
    for key in ("commit", "commit_short", "dirty", "source_sha256", "date", "python", "torch",
                "transformers", "triton", "safetensors", "torch_threads", "cpu_count", "gpu",
                "argv", "command"):
        assert key in p, key
    assert len(p["source_sha256"]) == 64 and p["date"].endswith("+00:00")
    row = prov.record_fields(p)
    assert set(row) == {"commit", "dirty", "source_sha256", "gpu", "date", "torch", "command"}
    assert row["command"].startswith("python ")
    assert len(row["source_sha256"]) == prov.ROW_HASH_CHARS


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_merge_csv_rows_keeps_other_commits_and_replaces_same_key(tmp_path):
    f = tmp_path / "b.csv"
    key = ("model", "config", "commit")
    merge_csv_rows(f, [{"model": "m", "config": "a", "tps": 1.0, "commit": "c1"},
                       {"model": "m", "config": "b", "tps": 2.0, "commit": "c1"}], key)
    merge_csv_rows(f, [{"model": "m", "config": "a", "tps": 3.0, "commit": "c2", "dirty": True}],
                   key)
    merge_csv_rows(f, [{"model": "m", "config": "b", "tps": 4.0, "commit": "c1"},
                       {"model": "m", "config": "c", "tps": 5.0, "commit": "c1"}], key)
    rows = _read(f)
    assert [(r["config"], r["commit"], r["tps"]) for r in rows] == [
        ("a", "c1", "1.0"), ("b", "c1", "4.0"), ("a", "c2", "3.0"), ("c", "c1", "5.0")]
    assert list(rows[0]) == ["model", "config", "tps", "commit", "dirty"]  # union, stable
    assert rows[0]["dirty"] == "" and rows[2]["dirty"] == "True"
    assert not [p for p in tmp_path.iterdir() if p.name != "b.csv"], "temp file left behind"
    with pytest.raises(ValueError, match="key columns"):
        merge_csv_rows(f, [{"model": "m"}], key)


def test_merge_json_rows_and_legacy_files(tmp_path):
    f = tmp_path / "v.json"
    f.write_text(json.dumps({"gpu": "H100", "commit": "c0", "rows": [{"shape": "s", "us": 1}]}))
    merge_json_rows(f, [{"shape": "s", "us": 2, "gpu": "H100", "commit": "c1"}],
                    ("shape", "gpu", "commit"))
    merge_json_rows(f, [{"shape": "s", "us": 3, "gpu": "H100", "commit": "c1"}],
                    ("shape", "gpu", "commit"))
    assert json.loads(f.read_text()) == [{"gpu": "H100", "commit": "c0", "shape": "s", "us": 1},
                                         {"shape": "s", "us": 3, "gpu": "H100", "commit": "c1"}]
    # an older {name: entry} file (the GEMV sweep) becomes one record per entry
    f.write_text('{"a": {"b": 1}, "c": {"b": 2}}')
    merge_json_rows(f, [{"name": "c", "b": 3}], ("name",))
    assert json.loads(f.read_text()) == [{"name": "a", "b": 1}, {"name": "c", "b": 3}]
    for bad in ('{"a": 1}', '[1, 2]', '{"a": {"b": 1}, "n": 2}'):
        f.write_text(bad)
        with pytest.raises(ValueError, match="no list of records"):
            merge_json_rows(f, [{"shape": "s"}], ("shape",))


def test_bench_script_rerun_keeps_rows_of_other_commits(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_lattice

    out = tmp_path / "lattice.csv"
    old = {"lattice": "9to3", "method": "pinv_torch_baseline", "device": "cpu",
           "seconds_per_1M": "9.9", "mse": "0.1", "commit": "0ld0ld0"}
    merge_csv_rows(out, [old], ("lattice", "method", "device", "commit"))
    argv = ["--lattices", "9to3", "--n_weights", "3000", "--repeats", "1", "--device", "cpu",
            "--output", str(out)]
    assert bench_lattice.main(argv) == 0
    assert bench_lattice.main(argv) == 0  # the documented command, run again
    rows = _read(out)
    assert rows[0]["commit"] == "0ld0ld0" and rows[0]["seconds_per_1M"] == "9.9"
    new = rows[1:]
    assert len(new) == len({r["method"] for r in new}) >= 2  # replaced, not duplicated
    assert all(r["commit"] == prov.git_sha() and len(r["source_sha256"]) == 16
               and r["gpu"] == "cpu" and r["date"] and r["torch"] for r in new)
