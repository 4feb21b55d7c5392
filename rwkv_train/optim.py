"""Optimiser parameter groups, as the reference trainer forms them."""

from __future__ import annotations

from torch import nn

# Per generation: learning-rate multiples by parameter-name fragment, as the reference trainers group
# them. Rules are tried in order and the first match wins (v6's time_decay_w1/w2 match "_w1"/"_w2" at 1x
# before "time_decay" at 2x); names matching no rule train at 1x.
_V5_V6 = (("_w1", 1.0), ("_w2", 1.0), ("time_mix", 1.0), ("time_maa", 1.0), ("time_decay", 2.0),
          ("time_faaaa", 1.0), ("time_first", 3.0))
LR_RULES = {
    "v4": (("time_mix", 1.0), ("time_decay", 2.0), ("time_first", 3.0)),
    "v5": _V5_V6,
    "v6": _V5_V6,
    "v7": (("att.w0", 2.0),),
}


def lr_scale(name: str, version: str) -> tuple[float, bool]:
    """(learning-rate multiple, whether a rule named the parameter) for one parameter name."""
    for fragment, scale in LR_RULES[version]:
        if fragment in name:
            return scale, True
    return 1.0, False


def param_groups(model: nn.Module, weight_decay: float, version: str = "v7") -> list[dict]:
    """Split parameters into groups, each with `lr_scale` and `weight_decay`.

    Weight decay goes only to 2-D `.weight` matrices (embedding, head, projections); parameters the
    generation's rules name (v7: att.w0 at 2x; v4-v6: time_decay 2x, time_first 3x, ...) get no decay;
    everything else 1x without decay.
    """
    groups: dict[tuple[float, float], list] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale, named = lr_scale(name, version)
        decays = not named and weight_decay > 0 and p.squeeze().dim() >= 2 and name.endswith(".weight")
        key = (scale, weight_decay if decays else 0.0)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    return [
        {"params": groups[k], "param_names": names[k], "lr_scale": k[0], "weight_decay": k[1]}
        for k in sorted(groups)
    ]
