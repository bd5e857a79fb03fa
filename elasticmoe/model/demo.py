"""The demo model: a small Mixtral trained at first use on the embedded corpus, so that the demo talks.

``train_demo_model`` builds a transformers ``MixtralForCausalLM`` (2 layers, 8 experts, top-2, hidden 64),
trains it deterministically (fixed seeds and batch order, no router load-balancing loss, so routing is as
skewed as the data makes it) to continue the paragraphs of ``tokenizer.CORPUS`` from any line or sentence
start and to answer its Q/A and User/Assistant lines in the ChatML template, then writes it with
``save_pretrained`` and the embedded tokenizer. 300 Adam steps: about 20 s on 2 idle CPU cores (far longer on a
busy machine).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from elasticmoe.model.tokenizer import CORPUS, IM_END, make_tokenizer

META_FILE = "elasticmoe_demo.json"
DEMO_PROMPTS = ("The quick brown fox", "Water boils at", "A mixture of experts",
                "Q: What is the capital of France?\nA:")


@dataclass(frozen=True)
class DemoArgs:
    """Model size and training recipe (written to ``elasticmoe_demo.json``; the cache key hashes it)."""

    layers: int = 2
    experts: int = 8
    top_k: int = 2
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    seq: int = 128  # tokens per training sample
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    chat_repeats: int = 4  # each chat sample appears this many times in the training set
    seed: int = 0
    threads: int = 1  # torch's intra-op threads while training: fixed, as a thread count changes the sums' order
    version: int = 1  # bump when the recipe changes in a way the fields above do not show

    def key(self) -> str:
        """A short stable id of these arguments (the cache directory's suffix)."""
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _starts(para: str) -> list[int]:
    """Character offsets where a line or a sentence starts in a paragraph (0 included)."""
    return sorted({0} | {m.end() for m in re.finditer(r"\n|[.!?:;] ", para) if m.end() < len(para)})


def chat_pairs(corpus: str = CORPUS) -> list[tuple[str, str]]:
    """(question, answer) pairs of the corpus' "Q: / A:" and "User: / Assistant:" lines."""
    pat = re.compile(r"^(?:Q|User): (.+)\n(?:A|Assistant): (.+(?:\n(?!Q:|User:)[^\n]+)*)", re.M)
    return [(q, a.replace("\n", " ")) for q, a in pat.findall(corpus)]


def training_samples(tokenizer: Any, a: DemoArgs) -> list[list[int]]:
    """Token id lists: every paragraph suffix from a line/sentence start (with EOS when it fits), then the
    chat pairs rendered by the chat template (ending in <|im_end|>)."""
    out = []
    for para in (p.strip("\n") for p in CORPUS.split("\n\n")):
        for s in _starts(para):
            ids = tokenizer.encode(para[s:])
            out.append(ids[: a.seq] if len(ids) >= a.seq else ids + [tokenizer.eos_token_id])
    for q, ans in chat_pairs():
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        ids = tokenizer.apply_chat_template(conv, tokenize=True)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        out += [ids[: a.seq]] * a.chat_repeats
    return out


def _batch_tensors(samples: list[list[int]], seq: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [N, S], attention_mask [N, S], labels [N, S] with -100 on padding), padded on the right."""
    n = len(samples)
    ids, mask = torch.full((n, seq), pad, dtype=torch.long), torch.zeros((n, seq), dtype=torch.long)
    labels = torch.full((n, seq), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = labels[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, labels


def demo_config(a: DemoArgs, tokenizer: Any):
    from transformers import MixtralConfig

    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    return MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=2048, tie_word_embeddings=False,
        router_aux_loss_coef=0.0, output_router_logits=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _progress(total: int, show: bool | None):
    """A tqdm bar on a terminal (or when asked), else a stand-in that does nothing."""
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if show is None else not show
    return tqdm(total=total, desc="training the demo model", unit="step", disable=disable, leave=False)


def train(a: DemoArgs = DemoArgs(), show_progress: bool | None = None) -> tuple[Any, Any, dict]:
    """Train the demo model in memory: (model in eval mode, tokenizer, stats {loss, seconds, samples})."""
    from transformers import MixtralForCausalLM

    tokenizer = make_tokenizer(a.vocab)
    samples = training_samples(tokenizer, a)
    ids, mask, labels = _batch_tensors(samples, a.seq, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(a.seed)
        model = MixtralForCausalLM(demo_config(a, tokenizer)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    order = torch.Generator().manual_seed(a.seed)
    t0, loss, threads = time.perf_counter(), float("nan"), torch.get_num_threads()
    torch.set_num_threads(a.threads)  # the caller's count (a test's, Ray's 1, a big host's) would change the weights
    try:
        with _progress(a.steps, show_progress) as bar:
            for _ in range(a.steps):
                pick = torch.randperm(len(samples), generator=order)[: a.batch]  # [B]
                out = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick])
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                loss = out.loss.item()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id, \
        model.config.eos_token_id
    return model, tokenizer, {"final_loss": loss, "train_seconds": time.perf_counter() - t0, "samples": len(samples)}


def train_demo_model(out: str | Path, a: DemoArgs = DemoArgs(), show_progress: bool | None = None) -> Path:
    """Train and write the demo checkpoint (``save_pretrained`` + tokenizer + ``elasticmoe_demo.json``)."""
    model, tokenizer, stats = train(a, show_progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps({**asdict(a), **stats}, indent=2, sort_keys=True) + "\n")
    return out


@torch.no_grad()
def routing_counts(model: Any, token_ids: list[int]) -> torch.Tensor:
    """Tokens routed to each expert of each MoE layer (top-k selections) over one forward: [L, E] float."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)

    def hook(mod: Any, args: tuple, _out: Any, layer: int) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # [T, H]
        top = (x @ mod.weight.float().T).topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, k]
        counts[layer] += torch.bincount(top.flatten(), minlength=cfg.num_local_experts).float()

    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
             for i, layer in enumerate(model.model.layers)]
    try:
        model(torch.tensor([token_ids]))
    finally:
        for h in hooks:
            h.remove()
    return counts


def corpus_routing(path: str | Path) -> torch.Tensor:
    """[L, E] expert token counts of the checkpoint at ``path`` over the corpus' paragraphs (transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return sum(routing_counts(model, tok.encode(p.strip("\n"))) for p in CORPUS.split("\n\n"))


def main(argv: list[str] | None = None) -> int:
    """``python -m elasticmoe.model.demo OUT``: train the demo model into OUT and print its continuations."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    out = train_demo_model(ap.parse_args(argv).out, show_progress=True)
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(str(out)), make_tokenizer()
    for p in DEMO_PROMPTS:
        x = torch.tensor([tok.encode(p)])
        y = model.generate(x, max_new_tokens=24, do_sample=False)[0, x.shape[1]:]
        print(f"{p!r} -> {tok.decode(y, skip_special_tokens=True)!r}")
    print(json.loads((out / META_FILE).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
