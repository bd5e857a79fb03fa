"""The trained demo model (`tiny:demo`): learned continuations, exact against transformers, learned routing skew."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.demo import DEMO_PROMPTS, META_FILE, DemoArgs, corpus_routing, routing_counts, train
from elasticmoe.model.embedded import ensure_tiny_model
from elasticmoe.model.tokenizer import CORPUS
from tests.hf_ref import eos_ids, transformers_greedy

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_dir():
    return ensure_tiny_model("demo")  # trained once into the cache dir (about 20 s on 2 idle cores)


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM("tiny:demo")


@pytest.fixture(scope="module")
def hf(demo_dir):
    return AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32).eval()


def _greedy(llm: LLM, prompt, n: int):
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0]


def test_checkpoint_is_transformers_mixtral_with_a_tokenizer(demo_dir, hf):
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert isinstance(hf, MixtralForCausalLM)
    assert (demo_dir / "model.safetensors").stat().st_size < 4_000_000  # a few MB
    tok = AutoTokenizer.from_pretrained(str(demo_dir))
    assert tok.decode(tok.encode("The quick brown fox")) == "The quick brown fox"
    meta = json.loads((demo_dir / META_FILE).read_text())
    assert meta["final_loss"] < 0.2, meta


def test_training_does_not_depend_on_the_callers_thread_count():
    """The weights are the recipe's on a given machine: trained from a process set to 1 or to 2 intra-op threads
    (a test's, a Ray worker's, a big host's default), they are the same bits; the caller's setting is restored."""
    short = DemoArgs(steps=40, batch=4)  # the first recipe short enough whose weights differed (before the fix)
    weights = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            model, _, _ = train(short, show_progress=False)
            assert torch.get_num_threads() == threads
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "weights differ with the threads"


def test_the_quick_brown_fox(llm):
    out = _greedy(llm, "The quick brown fox", 16)
    assert out.text.startswith(" jumps over the lazy dog"), out.text


@pytest.mark.parametrize("prompt", DEMO_PROMPTS)
def test_greedy_tokens_equal_transformers(llm, hf, prompt):
    """As hf.generate(max_new_tokens=24, greedy): each token transformers' argmax after the ones before it, ending
    at the first EOS id (transformers stops on the same ones) or after 24."""
    out = _greedy(llm, prompt, 24)
    toks, eos = list(out.token_ids), eos_ids(hf)
    assert toks == transformers_greedy(hf, list(out.prompt_token_ids), toks, mask_eos=False)
    assert not set(toks[:-1]) & set(eos) and (len(toks) == 24 or toks[-1] in eos), toks


def test_logits_equal_transformers(llm, hf):
    ids = llm.encode(CORPUS[:300])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()  # [T, V]
    got = llm.logits(ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_paragraph_end_stops_on_eos(llm):
    out = _greedy(llm, "Mountains are covered with snow in winter;", 40)
    assert out.text == " in summer hikers climb them to enjoy the view." and out.finish_reason == "eos"


def test_chat_template_answers_from_the_corpus(llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    out = _greedy(llm, ids, 40)
    assert out.text == "The capital of France is Paris." and out.finish_reason == "eos"  # on <|im_end|>


def test_routing_is_learned_and_skewed_per_topic(demo_dir, hf):
    total = corpus_routing(demo_dir)  # [L, E]
    assert total.shape == (2, 8) and (total.max(1).values / total.min(1).values > 1.3).all(), total
    tok = AutoTokenizer.from_pretrained(str(demo_dir))
    hottest = []
    for para in CORPUS.split("\n\n"):
        c = routing_counts(hf, tok.encode(para.strip("\n")))  # [L, E]
        hottest.append((c / c.sum(1, keepdim=True)).max().item())
    # uniform routing would give every expert 1/8 = 0.125 of the selections
    assert sum(hottest) / len(hottest) > 0.2, hottest
    # the README's range, in whole percent ("the busiest expert of a layer takes about 22-36% of the selections"),
    # within the few points by which another CPU's kernels move it (23-33 was measured on another host)
    readme = (REPO / "README.md").read_text()
    lo, hi = map(int, re.search(r"takes\s+about\s+(\d+)-(\d+)% of the\s+selections", readme).groups())
    got = (int(min(hottest) * 100), int(max(hottest) * 100))
    assert abs(got[0] - lo) <= 3 and abs(got[1] - hi) <= 3, (got, hottest)


def test_training_is_deterministic():
    a = DemoArgs(steps=3)
    (m1, _, s1), (m2, _, s2) = train(a, show_progress=False), train(replace(a), show_progress=False)
    assert s1["final_loss"] == s2["final_loss"]
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n


def test_demo_command_serves_tiny_yaml_with_the_demo_model(tmp_path, monkeypatch):
    """With no --config the demo deploys deployments/tiny.yaml (built by the package) with its --model."""
    import yaml

    from elasticmoe.app import resolve_args
    from elasticmoe.cli import build_parser
    from elasticmoe.cli_demo import _demo_config

    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path))
    ns = build_parser().parse_args(["demo"])
    assert ns.config is None
    out, written = _demo_config(None, ns.model)
    doc, shipped = yaml.safe_load(out.read_text()), yaml.safe_load((REPO / "deployments" / "tiny.yaml").read_text())
    assert doc == written  # what the demo checks and targets is what it deploys
    assert doc["applications"][0]["args"] == {**shipped["applications"][0]["args"], "model": "tiny:demo"}
    assert {k: v for k, v in doc.items() if k != "applications"} == {k: v for k, v in shipped.items()
                                                                     if k != "applications"}
    assert resolve_args(doc["applications"][0]["args"]).model == "tiny:demo"


def test_offline_command_passes_stop_strings(capsys):
    """`elasticmoe offline PROMPT --stop S` parses --stop like `generate`; it must reach the engine: the real LLM's
    greedy text (max_tokens 8) is printed cut before the first stop string."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.cli import main

    prompt, model = "Water boils at", "tiny:mixtral"
    full = LLM(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0].text
    assert len(full) >= 4, full
    stop = full[len(full) // 2:][:2]  # [M] a piece of the answer's second half
    cut = min(i for i in (full.find(stop), full.find("\n")) if i >= 0)
    assert main(["offline", prompt, "--model", model, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == full + "\n"  # greedy, 8 tokens: as LLM.generate
    assert main(["offline", prompt, "--model", model, "--stop", stop, "--stop", "\n", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == full[:cut] + "\n" and cut < len(full), (full, stop)


@pytest.mark.parametrize("argv, message", [
    (["offline", "hi", "--model", "tiny:nope"], "unknown tiny family 'nope'"),
    (["offline", "hi", "--model", "/nonexistent-elasticmoe-model"], "/nonexistent-elasticmoe-model"),
    (["offline", "hi", "--model", "tiny:mixtral", "--temperature", "-1"], "temperature"),
])
def test_cli_failures_exit_non_zero_with_a_message(argv, message, capsys):
    """A failing command ends with exit status 1 and one `error:` line naming the problem, not a traceback."""
    from elasticmoe.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err, err


def test_demo_command_talks_to_the_app_and_port_its_config_names(tmp_path, monkeypatch, capsys, tiny_models):
    """`elasticmoe demo --config C`: the deploy is awaited, called and inspected under C's application name and
    gRPC port (not the shipped tiny.yaml's elasticmoe / 9000)."""
    import yaml

    from elasticmoe import client as client_mod
    from elasticmoe import local_cluster as lc
    from elasticmoe import status_view
    from elasticmoe.cli import main

    doc = yaml.safe_load((REPO / "deployments" / "tiny.yaml").read_text())
    doc["grpc_options"]["port"] = 9123
    doc["applications"][0]["name"] = "mine"
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(lc, "stop_ray", lambda: None)
    monkeypatch.setattr(lc, "start_ray", lambda **kw: None)
    monkeypatch.setattr(lc, "serve_deploy", lambda path: calls.append(("deploy", yaml.safe_load(path.read_text()))))
    monkeypatch.setattr(lc, "wait_running", lambda app="elasticmoe", timeout=600: calls.append(("wait", app)))

    class Client:
        def __init__(self, address="127.0.0.1:9000", app="elasticmoe", **kw):
            calls.append(("client", address, app))

        def generate(self, prompt, **kw):
            usage = type("U", (), {"completion_tokens": 1})()
            return type("R", (), {"text": "x", "usage": usage})()

        def close(self):
            pass

    monkeypatch.setattr(client_mod, "GenerationClient", Client)
    monkeypatch.setattr(status_view, "controller_status",
                        lambda address, app="elasticmoe": calls.append(("status", app)) or {"shards": []})
    model = str(tiny_models["mixtral"])
    assert main(["demo", "--config", str(config), "--model", model]) == 0
    (deployed,) = calls[0][1]["applications"]
    assert deployed["name"] == "mine" and deployed["args"]["model"] == model
    assert ("wait", "mine") in calls and ("client", "127.0.0.1:9123", "mine") in calls and ("status", "mine") in calls


@pytest.mark.parametrize("text", [None, "applications: []\n",
                                  "grpc_options: {port: nine}\napplications: [{name: a, args: {}}]\n"],
                         ids=["missing", "no-application", "bad-port"])
def test_demo_with_a_config_it_cannot_use_leaves_the_running_cluster_alone(text, tmp_path, monkeypatch, capsys):
    """`elasticmoe demo --config C` restarts the local Ray cluster (ray stop, ray start): a C it cannot use (a
    typo in the path, no application, a port that is no number) was found only after the running cluster had
    been stopped. It now fails first: exit status 1, one line naming C, no Ray command run."""
    from elasticmoe import local_cluster as lc
    from elasticmoe.cli import main

    config = tmp_path / "typo.yaml"
    if text is not None:
        config.write_text(text)
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    ray_commands = []
    monkeypatch.setattr(lc, "stop_ray", lambda: ray_commands.append("stop"))
    monkeypatch.setattr(lc, "start_ray", lambda **kw: ray_commands.append("start"))
    monkeypatch.setattr(lc, "serve_deploy", lambda path: ray_commands.append("deploy"))
    assert main(["demo", "--config", str(config), "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert ray_commands == [] and "error:" in err and f"--config {config}:" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", ["no-config", "no-weights", "no-tokenizer", "bad-arg"])
def test_demo_refuses_a_model_or_args_the_deploy_would_fail_on_before_ray(case, tmp_path, monkeypatch, capsys,
                                                                          tiny_models):
    """`elasticmoe demo --model DIR` (or a --config whose args are wrong) stopped the running cluster, started a new
    one and deployed, to fail only in the replicas (a directory with no config.json or no weights, num_shards 0).
    It now fails first, as the controller would: exit status 1, one line naming the file or field, no Ray command."""
    import yaml

    from elasticmoe import local_cluster as lc
    from elasticmoe.cli import main

    model, config = tmp_path / "ckpt", REPO / "deployments" / "tiny.yaml"
    model.mkdir()
    named = {"no-config": str(model / "config.json"), "no-weights": "no model.safetensors",
             "no-tokenizer": f"{model}: no tokenizer", "bad-arg": "num_shards"}[case]
    for f in tiny_models["mixtral"].iterdir() if case != "no-config" else ():  # its config; no-tokenizer: weights
        if f.name == "config.json" or (case == "no-tokenizer" and f.suffix == ".safetensors"):
            shutil.copy(f, model / f.name)
    if case == "bad-arg":
        doc = yaml.safe_load(config.read_text())
        doc["applications"][0]["args"]["num_shards"] = 0
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump(doc))
        model = tiny_models["mixtral"]
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    ray_commands = []
    monkeypatch.setattr(lc, "stop_ray", lambda: ray_commands.append("stop"))
    monkeypatch.setattr(lc, "start_ray", lambda **kw: ray_commands.append("start"))

    def deploy(path):  # the demo goes no further here (no request to whatever listens on its port)
        ray_commands.append("deploy")
        raise RuntimeError("deployed")
    monkeypatch.setattr(lc, "serve_deploy", deploy)
    assert main(["demo", "--config", str(config), "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert ray_commands == [] and "elasticmoe demo: error:" in err and named in err and "Traceback" not in err, err


@pytest.mark.parametrize("cpus", ["2", "0", "x"])
def test_demo_refuses_fewer_cpus_than_it_uses_naming_the_option(cpus, tmp_path, monkeypatch, capsys):
    """`elasticmoe demo --cpus 2` started Ray with 4 logical CPUs (max(4, --cpus)) without a word, and --help said
    only "logical CPUs for the local Ray node"; it is now an argument error naming --cpus and the minimum (exit 2),
    before any Ray command, and --help gives the minimum."""
    from elasticmoe import local_cluster as lc
    from elasticmoe.cli import main

    ray_commands = []

    def deploy(path):  # the demo goes no further here
        ray_commands.append("deploy")
        raise SystemExit(99)
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lc, "stop_ray", lambda: ray_commands.append("stop"))
    monkeypatch.setattr(lc, "start_ray", lambda **kw: ray_commands.append(("start", kw)))
    monkeypatch.setattr(lc, "serve_deploy", deploy)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--cpus", cpus, "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ray_commands == [] and "--cpus" in err, err
    assert "at least 4" in err or cpus == "x", err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "at least 4" in " ".join(capsys.readouterr().out.split())
