"""MLA decode with kv_b absorbed into the query and the output: attention over the cached latents, no key expanded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32


@dataclass(frozen=True)
class Absorbed:
    """kv_b [h * (nope + v), r] split per head: w_uk [h, nope, r] (a key's nope dims from its latent) and w_uv
    [h, v, r] (a value from its latent), the products summed in float32. On CPU, float32 views of kv_b, one float32
    copy of a half-precision kv_b made at load (2x its bytes): an AVX2 CPU casts bf16 slowly, 5x the products' time
    at DeepSeek-V3's 128 heads. On an accelerator, views of kv_b in its own dtype, nothing held beside it (a float32
    copy was 64 MiB a DeepSeek-V3 layer, 4 GiB over its 61, uncounted by the memory check before the KV cache):
    each product casts its half of one layer's kv_b to float32 for that call, the same float32 sums either way.

    q_nope . (w_uk[h] c) = (q_nope w_uk[h]) . c: a decode query becomes q_lat [h, r] once, its scores are q_lat .
    c_kv + q_rope . k_rope over the cached latents themselves, and its output the probability-weighted latents times
    w_uv[h]: per key O(h (r + rope)) work, where expanding each key through kv_b is O(r h (nope + v))."""

    w_uk: torch.Tensor  # [h, nope, r] float32 (CPU) or kv_b's dtype
    w_uv: torch.Tensor  # [h, v, r]

    @classmethod
    def of(cls, kv_b: torch.Tensor, heads: int, nope: int, v: int, float32_copy: bool | None = None) -> "Absorbed":
        """The split of kv_b [h * (nope + v), r]; float32_copy: hold it in float32 (default: on CPU only)."""
        if float32_copy is None:
            float32_copy = cls.keeps_float32_copy(kv_b.device)
        w = (kv_b.to(F32) if float32_copy else kv_b).view(heads, nope + v, kv_b.shape[1])  # [h, nope + v, r]
        return cls(w_uk=w[:, :nope], w_uv=w[:, nope:])

    @staticmethod
    def keeps_float32_copy(device: torch.device | str) -> bool:
        """Whether `of` holds a float32 copy of a half-precision kv_b on `device` by default: on CPU only."""
        return torch.device(device).type == "cpu"

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, h, nope + rope] float32 -> [B, h, r + rope]: the nope part through w_uk, the rope part as it is
        (scored against the latents' cached rope keys [B, n, r + rope] in one product)."""
        nope = self.w_uk.shape[1]
        q_lat = torch.bmm(q[..., :nope].transpose(0, 1), self.w_uk.to(F32)).transpose(0, 1)  # [B, h, r]
        return torch.cat((q_lat, q[..., nope:]), dim=-1)

    def attend(self, q: torch.Tensor, lat: torch.Tensor, mask: torch.Tensor, scale: float,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """A decode group's attention over its latents: q [B, h, nope + rope] float32, lat [B, n, r + rope] float32
        (the cached latents read), mask [B, 1, 1, n] bool (True = attended) -> [B, h, v] float32. The heads share
        the latents: one product scores them all (the heads as its query axis), and only the [B, h, n] scores are
        scaled (SDPA's math path scales a copy of every key). sinks [h]: GPT-OSS's extra logit per head joins the
        softmax and is dropped after it (no MLA family has them; kept as the expand path's attention has them)."""
        s = torch.matmul(self.query(q), lat.transpose(1, 2)) * scale  # [B, h, n]
        s = s.masked_fill(~mask[:, 0], float("-inf"))  # mask [B, 1, n]: each row's over its h heads
        if sinks is not None:
            s = torch.cat((s, sinks.to(s.dtype).view(1, -1, 1).expand(s.shape[0], -1, 1)), dim=-1)  # [B, h, n + 1]
        p = s.softmax(dim=-1)
        p = p if sinks is None else p[..., :-1]
        p = p.masked_fill(~mask[:, 0], 0.0)  # a row with every key masked: zeros, as SDPA gives, not NaN
        return self.out(torch.matmul(p, lat[..., : self.w_uk.shape[2]]))  # [B, h, r] -> [B, h, v]

    def out(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The probability-weighted latents o_lat [B, h, r] float32 -> the values' weighted sum [B, h, v]."""
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv.to(F32).transpose(1, 2)).transpose(0, 1)  # [B, h, v]
