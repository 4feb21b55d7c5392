"""The CUDA kernel loader (rwkv_train.ops.kernels) on any machine: reasons, caching, locks, poisoning.

The kernels themselves are tested on the GPU (tests/test_kernels_cuda.py); here the build is replaced
by a stand-in where one is needed, so the loader's own behaviour is checked without CUDA.
"""

from __future__ import annotations

import fcntl
import logging
import types

import pytest
import torch

from rwkv_train.config import ModelConfig, load_config
from rwkv_train.errors import ConfigError
from rwkv_train.models import build_model
from rwkv_train.ops import kernels
from tests.conftest import REPO


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty build cache under tmp_path, CUDA and a compiler pretended present, builds faked."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_failed", {})
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_compiler_problem", lambda: None)
    builds = []

    def fake_load(name, sources, extra_cuda_cflags, extra_include_paths, build_directory, verbose):
        from pathlib import Path

        assert not (Path(build_directory) / "lock").exists(), "a stale torch lock was left in place"
        builds.append(types.SimpleNamespace(name=name, sources=sources, flags=extra_cuda_cflags))
        return types.SimpleNamespace(name=name)

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return builds


def test_reasons_name_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.unavailable_reason("v7", 64) == "no CUDA device is available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "head size 96" in kernels.unavailable_reason("v7", 96)
    assert "unknown generation" in kernels.unavailable_reason("v8", 64)
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(kernels.shutil, "which", lambda name, path=None: None)
    assert "nvcc" in kernels.unavailable_reason("v7", 64)


def test_load_without_cuda_says_how_to_go_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kernels.KernelUnavailable, match="no CUDA device.*model.kernel=torch"):
        kernels.load("v7", 64)


def test_every_source_exists_and_flags_carry_the_head_size():
    for generation, source in kernels.SOURCES.items():
        assert (kernels.cuda_dir() / source).is_file(), source
        flags = kernels.nvcc_flags(generation, 64)
        assert ("-DHEAD_SIZE=64" in flags) == (generation != "v4")
        assert not any("T=" in f or "Tmax" in f for f in flags), "nothing about T is compiled in"


def test_builds_are_cached_per_generation_and_head_size(fresh_loader):
    first = kernels.load("v7", 64)
    assert kernels.load("v7", 64) is first
    kernels.load("v7", 128)
    kernels.load("v6", 64)
    kernels.load("v5", 64)  # the same source as v6: its own cache entry, the same module name
    kernels.load("v4")
    names = [b.name for b in fresh_loader]
    assert len(names) == 5 and len(set(names)) == 4
    assert all(b.sources[0].startswith("/") for b in fresh_loader), "sources are passed by absolute path"
    assert "-DHEAD_SIZE=128" in fresh_loader[1].flags


def test_module_name_follows_the_source(monkeypatch, tmp_path):
    before = kernels.module_name("v7", 64)
    copy = tmp_path / "cuda"
    copy.mkdir()
    for f in kernels.cuda_dir().iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kernels, "cuda_dir", lambda: copy)
    assert kernels.module_name("v7", 64) == before
    (copy / "wkv7.cu").write_text((copy / "wkv7.cu").read_text() + "\n// edited\n")
    assert kernels.module_name("v7", 64) != before, "an edited kernel must be rebuilt, not loaded stale"


def test_module_name_of_another_folder_of_sources(tmp_path):
    """An earlier version's sources (scripts/bench_wkv7_versions.py) are named by their content too: the
    same sources as cuda/ give the same build, an edited header another."""
    copy = tmp_path / "version"
    copy.mkdir()
    for f in kernels.cuda_dir().iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert kernels.module_name("v7-chunked", 64, copy) == kernels.module_name("v7-chunked", 64)
    (copy / "wkv_common.cuh").write_text((copy / "wkv_common.cuh").read_text() + "\n// edited\n")
    assert kernels.module_name("v7-chunked", 64, copy) != kernels.module_name("v7-chunked", 64)


def test_a_stale_torch_lock_is_reported_and_removed(fresh_loader, caplog):
    directory = kernels.build_dir() / kernels.module_name("v7", 64)
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # what an interrupted torch build leaves behind
    with caplog.at_level(logging.WARNING, logger="rwkv_train"):
        kernels.load("v7", 64)  # the fake build asserts the lock is gone
    assert "stale build lock" in caplog.text and str(directory / "lock") in caplog.text


def test_the_build_lock_excludes_other_builders(tmp_path):
    with kernels._build_lock(tmp_path):
        with open(tmp_path / "rwkv_train.flock", "a+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "rwkv_train.flock", "a+") as other:  # released afterwards
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_failed_build_is_remembered_and_auto_falls_back(fresh_loader, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x'\nnvcc fatal: something")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(kernels.KernelUnavailable, match="building .* failed"):
        kernels.load("v7", 64)
    assert "failed" in kernels.unavailable_reason("v7", 64)
    cuda_like = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    with caplog.at_level(logging.WARNING, logger="rwkv_train"):
        assert kernels.use_cuda("auto", "v7", cuda_like, 64) is False
        assert kernels.use_cuda("auto", "v7", cuda_like, 64) is False
    assert caplog.text.count("using the PyTorch v7 backend") == 1, "auto says why once, not every call"
    with pytest.raises(kernels.KernelUnavailable):
        kernels.use_cuda("cuda", "v7", cuda_like, 64)


def test_use_cuda_choices():
    cpu = torch.zeros(1)
    assert kernels.use_cuda("torch", "v7", cpu, 64) is False
    assert kernels.use_cuda("auto", "v7", cpu, 64) is False
    with pytest.raises(kernels.KernelUnavailable, match="inputs are on cpu"):
        kernels.use_cuda("cuda", "v7", cpu, 64)
    with pytest.raises(ValueError, match="valid choices"):
        kernels.use_cuda("fast", "v7", cpu, 64)


def test_poisoned_outputs_fill_nan_only_inside():
    with kernels.poisoned_outputs():
        assert torch.isnan(kernels.new_output((3, 4), torch.float32, torch.device("cpu"))).all()
        assert torch.isnan(kernels.new_output((2,), torch.bfloat16, torch.device("cpu"))).all()
    assert not kernels._poison


def test_model_kernel_reaches_every_block_and_config_validates():
    for version in ("v4", "v5", "v6", "v7"):
        cfg = ModelConfig(version=version, n_layer=2, n_embd=64, head_size=32, vocab_size=64, kernel="torch")
        model = build_model(cfg)
        assert {block.att.kernel for block in model.blocks} == {"torch"}
    with pytest.raises(ConfigError, match="model.kernel"):
        load_config(str(REPO / "configs" / "demo.yaml"), ["model.kernel=triton"])


def test_cuda_tool_is_found_on_path_then_beside_nvcc(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    toolkit, elsewhere = tmp_path / "cuda", tmp_path / "bin"
    (toolkit / "bin").mkdir(parents=True), elsewhere.mkdir()
    for folder in (toolkit / "bin", elsewhere):
        tool = folder / "compute-sanitizer"
        tool.write_text("#!/bin/sh\n"), tool.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert kernels.cuda_tool("compute-sanitizer") == str(elsewhere / "compute-sanitizer")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert kernels.cuda_tool("compute-sanitizer") == str(toolkit / "bin" / "compute-sanitizer")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert kernels.cuda_tool("compute-sanitizer") is None
