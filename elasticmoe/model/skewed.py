"""A tiny Mixtral whose routers favour a few experts: skewed expert load for elasticity tests and benchmarks."""

from __future__ import annotations

from pathlib import Path


def make_skewed_model(out: Path, hot: tuple[int, ...] = (0, 1), strength: float = 3.0) -> Path:
    """A tiny Mixtral whose routers favour `hot` experts: each hot row gains the mean router-input direction."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elasticmoe.model.tiny import make_tiny_model

    base = make_tiny_model("mixtral", out.parent / (out.name + "-base"), layers=2, experts=8)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    routers = [layer.mlp.gate for layer in model.model.layers]
    seen: dict[int, list] = {}

    def hook(i):
        return lambda mod, a: seen.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))  # [T, H]

    hooks = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(routers)]
    with torch.no_grad():
        for text in ("The quick brown fox jumps over the lazy dog", "Once upon a time there was a king",
                     "Mixture of experts routes tokens", "hello world, this is skewed traffic"):
            model(torch.tensor([tok.encode(text)]))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, r in enumerate(routers):
            x = torch.cat(seen[i])
            d = (x / x.norm(dim=1, keepdim=True)).mean(0)
            scale = r.weight.norm(dim=1).mean() / x.norm(dim=1).mean()
            for rank, e in enumerate(hot):
                r.weight[e] += (strength - rank) * d / d.norm() ** 2 * scale
    model.save_pretrained(str(out))
    for f in base.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out
