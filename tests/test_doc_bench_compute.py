"""The README's and benchmarks/KERNELS.md's compute tables (real-width model, overlap, expert kernels, MLA and
sparse attention, Gated DeltaNet) say the figures of the committed JSON in benchmarks/results/.

Each printed number must be its JSON value rounded to the digits printed (1.64x is 1.635-1.645). In-process and
fast: it reads the documents and the JSON only (tests/doc_util.py: _json, _table, _says).
"""

from __future__ import annotations

import re

import pytest

from tests.doc_util import REPO, _json, _says, _table


def test_real_width_tables():
    res = _json("real_width-amd-epyc.json")
    ours, hf = res["elasticmoe"], res["transformers"]
    speed = _table("README.md", "| batch | elasticmoe tok/s | transformers tok/s")
    assert [r[0] for r in speed] == [str(b) for b in res["args"]["batches"]]
    for batch, o, t, ratio in speed:
        _says(o, ours["tok_s"][batch])
        _says(t, hf["tok_s"][batch])
        _says(ratio, ours["tok_s"][batch] / hf["tok_s"][batch])
    gib = 2 ** 30
    for name, load_s, anon, file, after in _table("README.md", "| | load s | peak anonymous GiB"):
        r = res[name]
        _says(load_s, r["load_s"])
        _says(anon, r["peak"]["RssAnon"] / gib)
        _says(file, r["peak"]["RssFile"] / gib)
        _says(after, r["after_load"]["RssAnon"] / gib, r["after_load"]["RssFile"] / gib)
    acc = res["accuracy"]
    table = _table("README.md", "| prompt | tokens | elasticmoe bf16")
    for i, (prompt, tokens, e, t) in enumerate(table):
        if prompt == "all":
            _says(tokens, sum(acc["tokens"]))
            _says(e, acc["elasticmoe"]["max_rel_all"], acc["elasticmoe"]["median_rel_all"])
            _says(t, acc["transformers"]["max_rel_all"], acc["transformers"]["median_rel_all"])
        else:
            assert int(prompt) == i
            _says(tokens, acc["tokens"][i])
            _says(e, acc["elasticmoe"]["max_rel"][i], acc["elasticmoe"]["median_rel"][i])
            _says(t, acc["transformers"]["max_rel"][i], acc["transformers"]["median_rel"][i])


def test_overlap_table():
    results = {(r["tokens"], r["delay_ms"]): r["schedules"] for r in _json("overlap.json")["results"]}
    for tokens, delay, *ratios in _table("README.md", "| tokens | expert latency d"):
        s = results[(int(tokens), float(delay.split()[0]))]
        for cell, schedule in zip(ratios, ("old 2", "ping-pong 2", "ping-pong 3")):
            _says(cell, s[schedule]["ratio_vs_sequential"])


def test_kernels_table():
    """benchmarks/KERNELS.md's H200 table: ours µs, % of copy bandwidth and speed-up over `_grouped_mm`."""
    summary = {(r["model"], r["tokens"]): r for r in _json("kernels-NVIDIA_H200.json")["summary"]}
    table = _table("benchmarks/KERNELS.md", "| model | T | ours µs")
    assert len(table) == len(summary)
    rows = {(r["model"], r["tokens"], r["impl"]): r for r in _json("kernels-NVIDIA_H200.json")["rows"]}
    timed = lambda r: r["us_graph"] if r.get("us_graph") is not None else r["us"]  # noqa: E731 (as kernels.py rates)
    for model, tokens, ours_us, pct, tflops, gmm_us, speedup, torch_us, err in table:
        r = summary[(model, int(tokens))]
        ours = rows[(model, int(tokens), "elasticmoe-triton")]
        gmm = rows[(model, int(tokens), "torch._grouped_mm-only")]
        _says(ours_us, r["ours_us"])
        _says(pct, r["pct_peak_bw"])
        _says(tflops, ours["tflops"])
        _says(gmm_us, timed(gmm))
        _says(speedup, r["vs_grouped_mm"])
        _says(torch_us, timed(rows[(model, int(tokens), "elasticmoe-torch")]))
        assert err == f"{ours['err']:.1e}", f"{model} T={tokens}: rel err {err}, the JSON {ours['err']:.1e}"
    faster = sum(r["vs_grouped_mm"] > 1 for r in summary.values())
    text = (REPO / "benchmarks" / "KERNELS.md").read_text()
    assert f"faster than `_grouped_mm` in {faster} of {len(summary)} rows" in text
    assert f"faster than `torch._grouped_mm` in {faster} of {len(summary)}" in (REPO / "README.md").read_text()


MLA_HEADER = "| context L | expand ms | absorbed ms | speed-up |"


def test_mla_decode_table():
    """MLA decode: per context length both reads' ms and the speed-up (expand / absorbed); the set-up, load and the
    outputs' largest difference the prose gives."""
    r = _json("mla_decode.json")
    table, a = _table("README.md", MLA_HEADER), r["args"]
    assert [int(row[0].replace(",", "")) for row in table] == [x["length"] for x in r["rows"]]
    for (_, expand, absorbed, speedup), x in zip(table, r["rows"]):
        _says(expand, x["expand_ms"])
        _says(absorbed, x["absorbed_ms"])
        _says(speedup, x["speedup"])
        assert x["speedup"] == pytest.approx(x["expand_ms"] / x["absorbed_ms"])
    text = " ".join((REPO / "README.md").read_text().split())
    assert (f"One decode group of {a['rows']} rows of L tokens each (`Attention.decode_group`, both ways in one run), "
            f"{a['heads']} heads, kv_lora_rank {a['kv_lora_rank']}, rope {a['rope']}, nope and value heads "
            f"{a['nope']}, fp32, median of {a['repeats']}") in text and a["nope"] == a["v_head_dim"]
    m = re.search(r"2 vCPUs, shared machine \(load average ([\d.]+) before and ([\d.]+) after the run; the VM", text)
    _says(f"{m.group(1)} {m.group(2)}", r["loadavg_before"][0], r["loadavg_after"][0])
    m = re.search(r"The outputs agree to (\de-\d+) \(the JSON's `max_abs_diff`, outputs up to ([\d.]+)\)", text)
    worst = max(x["max_abs_diff"] for x in r["rows"])
    assert float(m.group(1)) == float(f"{worst:.0e}") and worst < 1e-5
    _says(m.group(2), max(x["max_abs"] for x in r["rows"]))


def test_sparse_attention_table():
    """Sparse attention at decode: per context length both reads' ms, the gather's speed-up (mask / gather) and the
    indexer's ms; the outputs' largest difference the prose gives; the form measured (the engine's absorbed read)
    as the prose says."""
    result = _json("sparse_attention.json")
    rows = result["rows"]
    assert result["args"]["form"] == "absorbed"
    assert "(`Attention.decode_group`, the engine's read with `kv_b` absorbed, above)" in " ".join(
        (REPO / "README.md").read_text().split())
    table = _table("README.md", "| context L | mask ms")
    assert [int(r[0].replace(",", "")) for r in table] == [r["length"] for r in rows]
    for (_, mask, gather, speedup, index), r in zip(table, rows):
        _says(mask, r["mask_ms"])
        _says(gather, r["gather_ms"])
        _says(speedup, r["speedup"])
        _says(index, r["indexer_ms"])
        assert r["speedup"] == pytest.approx(r["mask_ms"] / r["gather_ms"])
    text = " ".join((REPO / "README.md").read_text().split())
    m = re.search(r"The speed-up approaches L / topk \((\d+)x and (\d+)x\).*? The outputs agree to (\de-\d+) \(", text)
    assert m, "the sparse-attention section's sentences moved or changed shape"
    assert [int(g) for g in m.groups()[:2]] == [r["length"] // r["topk"] for r in rows]
    worst = max(r["max_abs_diff"] for r in rows)
    assert float(m.group(3)) == float(f"{worst:.0e}") and worst < 1e-5
    # the indexer column from before the scoring went by spans (rows without indexer_read) says so, and only then
    assert all("indexer_read" in r for r in rows) == ("The indexer column predates its scoring in spans" not in text)


def test_kernels_split_share():
    """benchmarks/KERNELS.md: gate_up's share of the per-kernel split, the range over the rows and the T=1 outliers."""
    shares = {(r["model"], r["tokens"]): r["split_us"]["gate_up"] / sum(r["split_us"].values())
              for r in _json("kernels-NVIDIA_H200.json")["rows"] if r["impl"] == "elasticmoe-triton-split"}
    text = " ".join((REPO / "benchmarks" / "KERNELS.md").read_text().split())
    m = re.search(r"In the per-kernel split gate_up takes (\d+)-(\d+)% of the time \(of the four kernels' sum\) but "
                  r"in two T=1 rows that move little: Qwen3, (\d+)%, and the EP8 shard, (\d+)%", text)
    assert m, "KERNELS.md's gate_up share sentence moved or changed shape"
    outliers = {("qwen3-30b-a3b", 1): m.group(3), ("deepseek-v3-ep8", 1): m.group(4)}
    rest = [100 * s for key, s in shares.items() if key not in outliers]
    _says(f"{m.group(1)} {m.group(2)}", min(rest), max(rest))
    for key, printed in outliers.items():
        _says(printed, 100 * shares[key])


DELTANET_HEADER = "| prompt tokens | token by token ms | chunked ms | speed-up |"


def test_deltanet_table():
    """Gated DeltaNet prefill: the table's times and speed-ups, and the set-up and agreement its paragraph gives."""
    r = _json("deltanet-amd-epyc.json")
    table = _table("README.md", DELTANET_HEADER)
    assert [int(row[0]) for row in table] == [x["tokens"] for x in r["rows"]]
    for (_, rec, chunked, speedup), x in zip(table, r["rows"]):
        _says(rec, x["recurrent_ms"])
        _says(chunked, x["chunked_ms"])
        _says(speedup, x["speedup"])
    a, text = r["args"], " ".join((REPO / "README.md").read_text().split())
    assert (f"{a['k_heads']} key heads x {a['head_dim']} repeated to {a['v_heads']} value heads x {a['head_dim']}, "
            f"float32, {r['threads']} thread, best of {a['repeats']}") in text
    m = re.search(r"shared \(load average ([\d.]+) before and ([\d.]+) after the run, on 2 vCPUs\)", text)
    _says(f"{m.group(1)} {m.group(2)}", r["loadavg_before"], r["loadavg_after"])
    m = re.search(r"which put the wall times ([\d.]+)-([\d.]+)x above them", text)
    walls = [x[f"{k}_wall_ms"] / x[f"{k}_ms"] for x in r["rows"] for k in ("recurrent", "chunked")]
    _says(f"{m.group(1)} {m.group(2)}", min(walls), max(walls))
    m = re.search(r"the chunked outputs and end states within ([\d.]+)e-(\d+) of the twin's", text)
    worst = max(max(x["max_abs_diff_out"], x["max_abs_diff_state"]) for x in r["rows"])
    assert worst <= float(f"{m.group(1)}e-{m.group(2)}") < 10 * worst, (m.groups(), worst)
