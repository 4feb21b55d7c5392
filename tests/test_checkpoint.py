"""Checkpoint files: atomic writes, weights-only loading, generation detection, shape checks."""

from __future__ import annotations

import pickle

import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, detect_version, load_into, load_weights, replace_atomically
from rwkv_train.config import ModelConfig
from rwkv_train.errors import CheckpointError
from rwkv_train.models import build_model, model_from_weights


class Boom:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rwkv-1.pth"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(2), "b": Boom()}, path)
    assert torch.equal(load_weights(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["rwkv-1.pth"]


def test_directory_checkpoints_are_swapped_whole(tmp_path):
    final, tmp = tmp_path / "resume.ckpt", tmp_path / "resume.ckpt.tmp"
    final.mkdir()
    (final / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    replace_atomically(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new"] and not tmp.exists()
    assert not (tmp_path / "resume.ckpt.old").exists()


class Payload:
    pass


def test_a_checkpoint_never_runs_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only RWKV checkpoint"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.pth")


def test_generation_is_told_by_keys():
    assert detect_version({"blocks.0.att.r_k": 0}) == "v7"
    assert detect_version({"blocks.0.att.time_maa_x": 0, "blocks.0.att.time_faaaa": 0}) == "v6"
    assert detect_version({"blocks.0.att.time_faaaa": 0, "blocks.0.att.time_mix_g": 0}) == "v5"
    assert detect_version({"blocks.0.att.time_first": 0, "blocks.0.att.time_mix_k": 0}) == "v4"
    with pytest.raises(CheckpointError, match="cannot tell the RWKV generation"):
        detect_version({"transformer.h.0.attn.weight": 0})
    with pytest.raises(CheckpointError, match=r"mixes keys of RWKV-v4 \(blocks.1.att.time_first\) and RWKV-v7"):
        detect_version({"blocks.0.att.r_k": 0, "blocks.1.att.time_first": 0})


def test_load_into_lists_every_difference_and_ignores_reference_extras():
    small = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=50))
    state = small.state_dict()
    # the reference trainer also saves (unused) value-residual weights for layer 0
    extra = {**state, "blocks.0.att.v0": torch.zeros(1, 1, 64), "blocks.0.att.v1": torch.zeros(64, 32),
             "blocks.0.att.v2": torch.zeros(32, 64)}
    fresh = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=50))
    load_into(fresh, extra, "ckpt")
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v)
    bigger_vocab = build_model(ModelConfig(n_layer=3, n_embd=64, head_size=32, vocab_size=60))
    with pytest.raises(CheckpointError) as err:
        load_into(bigger_vocab, state, "ckpt")
    text = str(err.value)
    assert "n_layer: checkpoint 2, model 3" in text and "vocab_size: checkpoint 50, model 60" in text
    assert "emb.weight: checkpoint (50, 64), model (60, 64)" in text


def test_model_from_weights_reads_dimensions_from_shapes(tmp_path):
    cfg = ModelConfig(n_layer=3, n_embd=128, head_size=64, vocab_size=77, dim_ffn=256)
    model = build_model(cfg)
    atomic_torch_save(model.state_dict(), tmp_path / "m.pth")
    loaded = model_from_weights(str(tmp_path / "m.pth"))
    d = loaded.dims
    assert (d.n_layer, d.n_embd, d.head_size, d.vocab_size, d.dim_ffn) == (3, 128, 64, 77, 256)
    idx = torch.randint(0, 77, (1, 5))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize("version", ["v4", "v5", "v6", "v7"])
def test_every_generation_round_trips_and_names_what_differs(tmp_path, version):
    cfg = ModelConfig(version=version, n_layer=2, n_embd=128, head_size=64, vocab_size=90)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "rwkv-final.pth"
    atomic_torch_save(model.state_dict(), path)
    loaded = model_from_weights(str(path))  # generation from the keys, every size from the shapes
    assert loaded.version == version and loaded.dims == model.dims
    idx = torch.randint(0, 90, (1, 6))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    wider = build_model(ModelConfig(version=version, n_layer=2, n_embd=192, head_size=64, vocab_size=90), "meta")
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 128, model 192"):
        load_into(wider, load_weights(path), "ckpt")
