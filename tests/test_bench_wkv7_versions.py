"""scripts/bench_wkv7_versions.py without a GPU: exporting a revision's kernel sources, the plan, its
argument checks, and how a version from before split heads is called."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run_cli

_spec = importlib.util.spec_from_file_location("bench_wkv7_versions", REPO / "scripts" / "bench_wkv7_versions.py")
versions = importlib.util.module_from_spec(_spec)
sys.modules["bench_wkv7_versions"] = versions
_spec.loader.exec_module(versions)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_export_writes_a_revisions_kernel_sources_once(tmp_path):
    folder = versions.export("HEAD", into=tmp_path / "versions")
    assert folder.name == _git("rev-parse", "--short=7", "HEAD").strip()
    assert (folder / "wkv7_chunked.cu").read_text() == _git("show", "HEAD:cuda/wkv7_chunked.cu")
    files = _git("ls-tree", "--name-only", "HEAD", "cuda/").split()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.removeprefix("cuda/") for p in files)
    before = (folder / "wkv7_chunked.cu").stat().st_mtime_ns
    assert versions.export("HEAD", into=tmp_path / "versions") == folder  # already there: kept as it is
    assert (folder / "wkv7_chunked.cu").stat().st_mtime_ns == before
    assert versions.exported(tmp_path / "versions") == [folder]
    with pytest.raises(ValueError, match="is not a commit"):
        versions.export("no-such-revision", into=tmp_path / "versions")


def test_plan_and_bad_arguments(tmp_path):
    folder = versions.export("HEAD", into=tmp_path / "versions")
    plan = run_cli("scripts/bench_wkv7_versions.py", "--plan", "--versions", str(folder), "--shapes", "2x64")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines() == [f"version {folder.name}: {folder / 'wkv7_chunked.cu'}",
                                        f"version this tree: {REPO / 'cuda' / 'wkv7_chunked.cu'}",
                                        "shapes: 2x64 at C=4096, head 64"]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli("scripts/bench_wkv7_versions.py", "--versions", str(empty))
    assert bad.returncode == 2 and "no wkv7_chunked.cu there" in bad.stderr
    odd = run_cli("scripts/bench_wkv7_versions.py", "--channels", "100")
    assert odd.returncode == 2 and "not a multiple of --head-size 64" in odd.stderr
    unknown = run_cli("scripts/bench_wkv7_versions.py", "--export", "no-such-revision")
    assert unknown.returncode == 2 and "is not a commit" in unknown.stderr
    if not torch.cuda.is_available():
        result = run_cli("scripts/bench_wkv7_versions.py", "--versions", str(folder))
        assert result.returncode == 1 and "needs a CUDA device" in result.stderr


def test_older_versions_are_called_without_the_arguments_they_came_before():
    """The op wrapper passes (r, lw, k, v, a, b, s0, y, s_final, states, sa, split) to forward and (r, lw, k,
    v, a, b, states, sa, dy, ds_final, dr, dlw, dk, dv, da, db, ds0, split) to backward."""
    class Before:  # a module from before split heads: no `splits`, no split argument, no sa
        def forward(self, *args):
            return args

        backward = forward

    class Split(Before):  # split heads, no sa
        splits = [1, 2, 4]

    class Now(Split):
        saved = ["states", "sa"]

    forward, backward = tuple(range(12)), tuple(range(18))
    old, split, now = (versions.Version(m()) for m in (Before, Split, Now))
    assert old.splits == [1] and split.splits == now.splits == [1, 2, 4]
    assert old.forward(*forward) == tuple(range(10)) and old.backward(*backward) == (*range(7), *range(8, 17))
    assert split.forward(*forward) == (*range(10), 11) and split.backward(*backward) == (*range(7), *range(8, 18))
    assert now.forward(*forward) == forward and now.backward(*backward) == backward


def test_build_kernels_builds_the_exported_versions_beside_the_current_kernels(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_kernels", REPO / "scripts" / "build_kernels.py")
    build_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_kernels)
    folder = versions.export("HEAD", into=tmp_path / "versions")
    monkeypatch.setattr(versions, "VERSIONS", tmp_path / "versions")
    jobs = build_kernels.build_jobs(["v5", "v6", "v7-chunked"], [32, 64, 128], versions=True)
    assert jobs == [("v5", 32), ("v5", 64), ("v5", 128), ("v7-chunked", 32), ("v7-chunked", 64),
                    (f"version {folder.name}", 64)]  # v5 and v6 share a build; the chunked kernel has no 128
    assert build_kernels.build_jobs(["v7-chunked"], [64], versions=False) == [("v7-chunked", 64)]
