"""Export to Hugging Face: the directory loads in transformers' RwkvForCausalLM and gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, weights_state_dict
from rwkv_train.config import ModelConfig
from rwkv_train.errors import CheckpointError, UserError
from rwkv_train.export_hf import export_hf, hf_key
from rwkv_train.models import build_model
from tests.conftest import run_cli

CFG = ModelConfig(version="v4", n_layer=3, n_embd=64, vocab_size=120)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_model(tmp_path, cfg: ModelConfig = CFG, dtype: torch.dtype = torch.float32):
    """A perturbed model (zero-initialised paths exercised, decays spread) and its rwkv-final.pth."""
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if cfg.version == "v4":
            for block in model.blocks:
                block.att.time_decay.add_(torch.randn_like(block.att.time_decay))
    path = tmp_path / "rwkv-final.pth"
    atomic_torch_save(weights_state_dict(model, dtype), path)
    return model, path


def test_key_renaming_follows_transformers():
    assert hf_key("emb.weight") == "rwkv.embeddings.weight"
    assert hf_key("blocks.0.ln0.bias") == "rwkv.blocks.0.pre_ln.bias"
    assert hf_key("blocks.10.ln2.weight") == "rwkv.blocks.10.ln2.weight"
    assert hf_key("blocks.3.att.time_mix_k") == "rwkv.blocks.3.attention.time_mix_key"
    assert hf_key("blocks.3.att.time_mix_v") == "rwkv.blocks.3.attention.time_mix_value"
    assert hf_key("blocks.3.att.time_mix_r") == "rwkv.blocks.3.attention.time_mix_receptance"
    assert hf_key("blocks.3.att.time_decay") == "rwkv.blocks.3.attention.time_decay"
    assert hf_key("blocks.1.ffn.time_mix_r") == "rwkv.blocks.1.feed_forward.time_mix_receptance"
    assert hf_key("blocks.1.ffn.key.weight") == "rwkv.blocks.1.feed_forward.key.weight"
    assert hf_key("ln_out.weight") == "rwkv.ln_out.weight"
    assert hf_key("head.weight") == "head.weight"


def test_transformers_gives_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the export test needs transformers (pip install transformers)")
    model, path = saved_model(tmp_path)
    out = tmp_path / "hf"
    result = run_cli("scripts/export_hf.py", "--checkpoint", str(path), "--output", str(out), "--context-length", "256")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["num_hidden_layers"] == 3

    config = json.loads((out / "config.json").read_text())
    expected = {"model_type": "rwkv", "vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 3,
                "attention_hidden_size": 64, "intermediate_size": 256, "layer_norm_epsilon": 1e-5,
                "rescale_every": 0, "context_length": 256, "tie_word_embeddings": False}
    assert {k: config[k] for k in expected} == expected

    hf = transformers.RwkvForCausalLM.from_pretrained(out).eval()
    hf_names = set(hf.state_dict())
    assert hf_names == {hf_key(k) for k in model.state_dict()}
    idx = torch.randint(0, 120, (2, 21))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
        # transformers' RNN mode: the prompt with use_cache, then one token at a time carrying its state
        # (batch 1: its one-token path broadcasts the shifted token wrongly for larger batches)
        first = hf(idx[:1, :9], use_cache=True)
        steps, state = [first.logits], first.state
        for t in range(9, 21):
            step = hf(idx[:1, t : t + 1], state=state, use_cache=True)
            steps.append(step.logits)
            state = step.state
    scale = max(1.0, ours.abs().max().item())
    assert (theirs - ours).abs().max().item() <= 1e-4 * scale
    assert (torch.cat(steps, 1) - ours[:1]).abs().max().item() <= 1e-4 * scale


def test_bf16_export_keeps_decays_in_float32(tmp_path):
    pytest.importorskip("safetensors", reason="exporting writes safetensors (pip install safetensors)")
    from safetensors.torch import load_file

    _, path = saved_model(tmp_path, dtype=torch.bfloat16)
    config = export_hf(path, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert config["dtype"] == "bfloat16"
    assert tensors["rwkv.blocks.0.attention.time_decay"].dtype == torch.float32
    assert tensors["rwkv.blocks.0.attention.key.weight"].dtype == torch.bfloat16
    assert export_hf(path, tmp_path / "hf32", dtype="fp32")["dtype"] == "float32"


def test_context_length_comes_from_the_run_config(tmp_path):
    pytest.importorskip("safetensors", reason="exporting writes safetensors (pip install safetensors)")
    _, path = saved_model(tmp_path)
    (tmp_path / "config.yaml").write_text("data:\n  ctx_len: 4096\n")
    assert export_hf(path, tmp_path / "hf")["context_length"] == 4096


def test_a_non_v4_checkpoint_is_refused(tmp_path):
    _, path = saved_model(tmp_path, ModelConfig(version="v7", n_layer=2, n_embd=64, head_size=32, vocab_size=50))
    with pytest.raises(CheckpointError, match=r"RWKV-v7 checkpoint; transformers' RwkvForCausalLM implements RWKV-4 only"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_extras_transformers_cannot_hold_are_refused(tmp_path):
    model, path = saved_model(tmp_path)
    state = weights_state_dict(model)
    state["blocks.0.pos_emb_x"] = torch.zeros(1, 8, 64)
    atomic_torch_save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected blocks.0.pos_emb_x"):
        export_hf(path, tmp_path / "hf")


def test_an_existing_output_is_not_overwritten(tmp_path):
    pytest.importorskip("safetensors", reason="exporting writes safetensors (pip install safetensors)")
    _, path = saved_model(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        export_hf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
