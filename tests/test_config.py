"""Config parsing, overrides, validation errors, and every file in configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rwkv_train.config import Config, all_keys, from_dict, load_config, parse_overrides
from rwkv_train.errors import ConfigError
from rwkv_train.models import count_params

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def minimal(**sections) -> dict:
    raw = {"data": {"train": "data/x"}, "train": {"max_steps": 10}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(model={"n_layer": 4})))
    cfg = load_config(path, ["train.max_steps=50", "optim.lr_init=1e-3", "optim.betas=[0.8, 0.95]",
                             "logging.wandb=offline", "train.grad_cp=true", "model.dim_ffn=512"])
    assert cfg.model.n_layer == 4 and cfg.train.max_steps == 50
    assert cfg.optim.lr_init == pytest.approx(1e-3) and isinstance(cfg.optim.lr_init, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.logging.wandb == "offline" and cfg.train.grad_cp is True and cfg.model.ffn_width == 512


def test_saved_config_round_trips(tmp_path):
    cfg = from_dict(minimal(optim={"betas": [0.9, 0.999]}))
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*did you mean train.max_steps\?"):
        from_dict(minimal(train={"max_step": 5}))
    with pytest.raises(ConfigError, match=r"did you mean train.micro_bsz\?"):
        from_dict(minimal(optim={"micro_bsz": 5}))  # right key, wrong section
    with pytest.raises(ConfigError, match=r"unknown section 'optm'.*did you mean optim\?"):
        from_dict({**minimal(), "optm": {"lr_init": 1.0}})


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        from_dict(minimal(model={"n_layer": "twelve", "head_sz": 64}, optim={"lr_init": "fast"},
                          train={"precision": "fp8"}))
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "model.n_layer='twelve': expected an integer" in text
    assert "did you mean model.head_size?" in text
    assert "optim.lr_init='fast': expected a number" in text
    assert "train.precision='fp8': expected one of fp32, tf32, fp16, bf16" in text


def test_value_checks_name_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"model.n_embd=96 is not divisible by model.head_size=64"):
        from_dict(minimal(model={"n_embd": 96}))
    with pytest.raises(ConfigError, match=r"exactly one of train.max_steps and train.max_tokens"):
        from_dict({"data": {"train": "x"}, "train": {}})
    with pytest.raises(ConfigError, match=r"optim.lr_final=0.01: expected 0 < lr_final <= lr_init"):
        from_dict(minimal(optim={"lr_init": 1e-3, "lr_final": 1e-2}))
    with pytest.raises(ConfigError, match=r"train.offload=optimizer needs train.strategy=deepspeed"):
        from_dict(minimal(train={"offload": "optimizer"}))
    with pytest.raises(ConfigError, match=r"train.accumulate and train.global_bsz are both set"):
        from_dict(minimal(train={"accumulate": 2, "global_bsz": 16}))


def test_wkv7_chunked_takes_auto_true_or_false_only():
    assert from_dict(minimal()).model.wkv7_chunked == "auto"
    for value in ("auto", True, False):
        chosen = from_dict(minimal(model={"wkv7_chunked": value})).model.wkv7_chunked
        assert chosen == value and type(chosen) is type(value)
    assert load_config_overrides(["model.wkv7_chunked=false"]).model.wkv7_chunked is False
    for bad in (1, 0, "yes"):
        with pytest.raises(ConfigError, match=rf"model.wkv7_chunked={bad!r}: expected one of auto, true, false"):
            from_dict(minimal(model={"wkv7_chunked": bad}))


def test_grad_cp_takes_false_true_selective_or_selective_wkv():
    assert from_dict(minimal(train={"grad_cp": "selective"})).train.grad_cp == "selective"
    assert load_config_overrides(["train.grad_cp=selective-wkv"]).train.grad_cp == "selective-wkv"
    assert load_config_overrides(["train.grad_cp=true"]).train.grad_cp is True
    with pytest.raises(ConfigError, match=r"train.grad_cp='partial': expected one of false, true, selective, selective-wkv$"):
        from_dict(minimal(train={"grad_cp": "partial"}))


def load_config_overrides(overrides: list[str]) -> Config:
    raw = minimal()
    for section, values in parse_overrides(overrides).items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def test_override_words_must_be_dotted():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides(["max_steps=5"])
    assert parse_overrides(["data.val=null", "model.load="]) == {"data": {"val": None}, "model": {"load": None}}


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_is_documented():
    source = (REPO / "rwkv_train" / "config.py").read_text()
    for key in all_keys():
        name = key.split(".")[1]
        # each field line is followed by its docstring line
        assert re.search(rf"\n    {name}: [^\n]+\n    \"\"\"", source), f"{key} has no docstring"


def stated_params(path: Path) -> float:
    match = re.search(r"^# params: ([\d.]+)([MB])", path.read_text(), re.M)
    assert match, f"{path.name} does not state its parameter count as '# params: <n>M|B'"
    return float(match.group(1)) * {"M": 1e6, "B": 1e9}[match.group(2)]


def test_configs_dir_has_the_presets():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "rwkv7-0.1b", "rwkv7-0.4b", "rwkv7-1.5b", "rwkv7-2.9b", "rwkv7-7.2b", "rwkv7-13.3b"} <= names
    assert {"rwkv6-1.6b", "rwkv6-3b", "rwkv6-7b", "rwkv6-14b", "rwkv5-0.4b", "rwkv5-1.5b", "rwkv5-3b",
            "rwkv5-7b", "rwkv4-169m", "rwkv4-430m", "rwkv4-1.5b", "rwkv4-3b", "rwkv4-7b", "rwkv4-14b"} <= names
    vocabs = {load_config(p).model.vocab_size for p in CONFIGS if p.stem.startswith("rwkv4")}
    assert vocabs == {50277, 65536}  # Pile-era GPT-NeoX and World


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_file_validates_and_states_its_size(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    n = count_params(cfg.model)
    assert abs(n - stated_params(path)) / stated_params(path) < 0.01, f"{path.name}: {n:,} parameters"
