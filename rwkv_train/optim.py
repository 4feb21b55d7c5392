"""Optimiser parameter groups, as the reference trainer forms them."""

from __future__ import annotations

from torch import nn

# Per generation: parameter-name fragments trained at a multiple of the base learning rate, as the
# reference trainers group them (first match wins; v6's time_decay_w1/w2 count as time_decay there too).
LR_SCALES = {
    "v4": {"att.time_decay": 2.0, "att.time_first": 3.0},
    "v5": {"att.time_decay": 2.0},
    "v6": {"att.time_decay": 2.0},
    "v7": {"att.w0": 2.0},
}


def param_groups(model: nn.Module, weight_decay: float, version: str = "v7") -> list[dict]:
    """Split parameters into groups, each with `lr_scale` and `weight_decay`.

    Weight decay goes only to 2-D `.weight` matrices (embedding, head, projections); generation-specific
    parameters (v7: att.w0) get a larger learning rate and no decay; everything else 1x without decay.
    """
    scales = LR_SCALES[version]
    groups: dict[tuple[float, float], list] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for frag, s in scales.items() if frag in name), 1.0)
        decays = scale == 1.0 and weight_decay > 0 and p.squeeze().dim() >= 2 and name.endswith(".weight")
        key = (scale, weight_decay if decays else 0.0)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    return [
        {"params": groups[k], "param_names": names[k], "lr_scale": k[0], "weight_decay": k[1]}
        for k in sorted(groups)
    ]
