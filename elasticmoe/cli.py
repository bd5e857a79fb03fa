"""The `elasticmoe` command: demo (the README's run command), generate, status, scale, make-tiny-model, offline."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

from elasticmoe.cli_demo import DEMO_CONFIG_NAME, DEMO_MIN_CPUS, cmd_demo, demo_cpus
from elasticmoe.model import tiny_cli  # no torch: a command imports the model when it runs (test_cli_imports)

OFFLINE_DEFAULTS = {"max_tokens": 32, "temperature": 0.0}  # what `offline` fills in for an unset flag


def _sampling_args(p: argparse.ArgumentParser, offline: bool = False) -> None:
    """The sampling flags; unset, `generate` leaves them to the server (grpc_api.sampling_from_proto), `offline`
    takes OFFLINE_DEFAULTS."""
    where = "default {:g}" if offline else "server default: the checkpoint's generation_config, else {}"
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (%s)" % where.format(
        OFFLINE_DEFAULTS["max_tokens"] if offline else 16))
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (%s)" % where.format(
        OFFLINE_DEFAULTS["temperature"] if offline else 1.0))
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--ignore-eos", action="store_true", default=None)


def _sampling(ns: argparse.Namespace) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
    return {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}


def cmd_generate(ns: argparse.Namespace) -> int:
    import grpc

    from elasticmoe.client import GenerationClient, check_api_key

    if ns.api_key:
        check_api_key(ns.api_key, "--api-key")
    client = GenerationClient(ns.address, app=ns.app, timeout_s=ns.timeout, api_key=ns.api_key)
    line_open = False  # streamed text printed with no newline yet
    try:
        if ns.stream:
            for r in client.stream(ns.prompt, stop=ns.stop, **_sampling(ns)):
                print(r.text, end="", flush=True)
                line_open = line_open or bool(r.text)
            print()
            line_open = False
        else:
            r = client.generate(ns.prompt, stop=ns.stop, **_sampling(ns))
            print(r.text)
            from elasticmoe.rpc import generation_pb2 as gen

            print(f"[{r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion tokens, "
                  f"finish: {gen.FinishReason.Name(r.finish_reason)}]", file=sys.stderr)
    except grpc.RpcError as e:
        if line_open:
            print(flush=True)  # the error's line starts on a line of its own, not after the partial text
        print(f"elasticmoe generate: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    from elasticmoe import status_view

    if ns.watch:
        return status_view.watch(status_view.fetcher(ns.address, ns.app), interval=ns.interval, as_json=ns.json)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the status (JSON stays parsable)
        st = status_view.controller_status(ns.address, ns.app)
    print(status_view.to_json(st) if ns.json else status_view.render(st))
    return 0


def cmd_scale(ns: argparse.Namespace) -> int:
    """Pin the app's shard count (--shards N) or hand it back to utilization-based autoscaling (--auto)."""
    from elasticmoe import status_view

    with contextlib.redirect_stdout(sys.stderr):
        handle = status_view.controller(ns.address, ns.app)
    try:
        desired = handle.set_target_shards.remote(None if ns.auto else ns.shards).result(timeout_s=30)
    except ValueError as e:  # the controller's refusal: Ray raises a subclass of ValueError, its `cause` the original
        print(f"elasticmoe scale: error: {getattr(e, 'cause', e)}", file=sys.stderr)
        return 2
    print(f"{ns.app}: desired shards {desired} ({'autoscaling' if ns.auto else 'pinned'})")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def cmd_offline(ns: argparse.Namespace) -> int:
    from elasticmoe import LLM, SamplingParams

    llm = LLM(ns.model, device=ns.device, dtype=ns.dtype)
    params = SamplingParams(**{**OFFLINE_DEFAULTS, **_sampling(ns), "stop": ns.stop or []})
    for out in llm.generate([ns.prompt], params):
        print(out.text)
    return 0


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0, at most MAX_TIMEOUT_S (more overflowed gRPC's deadline:
    the call failed at once)."""
    from elasticmoe.client import MAX_TIMEOUT_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:g} seconds, got {text!r}")
    return value


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given (`<dest>_given`): one that only matters with another."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def build_parser() -> argparse.ArgumentParser:
    """The `elasticmoe` command's arguments (tests/test_doc_claims.py parses every command line the docs show)."""
    parser = argparse.ArgumentParser(prog="elasticmoe", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="demo model -> local Ray -> serve deploy -> gRPC requests")
    p.add_argument("--config", default=None, help=f"Serve config to deploy (default: deployments/{DEMO_CONFIG_NAME}, "
                   "built into the package)")
    p.add_argument("--cpus", type=demo_cpus, default=DEMO_MIN_CPUS,
                   help=f"logical CPUs for the local Ray node (at least {DEMO_MIN_CPUS}, the default)")
    p.add_argument("--model", default="tiny:demo", help="model served (default: the demo model, trained on first use)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("generate", help="send a prompt to a served cluster over gRPC")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--app", default="elasticmoe", help="Serve application name (gRPC `application` metadata)")
    p.add_argument("--timeout", type=_positive_seconds, default=300.0, help="seconds before the call is cancelled")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--api-key", default=None, help="API key (default: $ELASTICMOE_API_KEY)")
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("status", help="placement version, shard health and load, hottest experts")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--app", default="elasticmoe", help="Serve application name")
    p.add_argument("--json", action="store_true",
                   help="print Controller.status() as JSON (with --watch: one line a frame)")
    p.add_argument("--watch", action="store_true", help="live view: redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_positive_seconds, default=2.0, action=_Given,
                   help="seconds between --watch frames (only with --watch)")
    p.set_defaults(fn=cmd_status, usage_error=p.error)  # main's check: `elasticmoe status: error:`, its usage
    p = sub.add_parser("scale", help="pin the number of expert shards, or hand it back to autoscaling")
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--app", default="elasticmoe", help="Serve application name")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--shards", type=_positive_int, help="shard count (within autoscaling's min..max_shards)")
    how.add_argument("--auto", action="store_true", help="back to utilization-based autoscaling")
    p.set_defaults(fn=cmd_scale)
    p = sub.add_parser("offline", help="complete a prompt in this process (the offline LLM API)")
    p.add_argument("prompt")
    p.add_argument("--model", default="tiny:demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    _sampling_args(p, offline=True)
    p.set_defaults(fn=cmd_offline)
    p = sub.add_parser("make-tiny-model", help="write a random tiny MoE checkpoint with transformers")
    tiny_cli.add_cli_arguments(p)
    p.set_defaults(fn=tiny_cli.main_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command; a failure is one `elasticmoe <command>: error: ...` line on stderr and exit status 1
    (Ctrl-C: 130), not a traceback."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "interval_given", False) and not ns.watch:  # was accepted and ignored: one status, at once
        ns.usage_error("--interval: only with --watch (the seconds between its frames)")
    try:
        return int(ns.fn(ns) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the command line's boundary: say what failed, in one line
        print(f"elasticmoe {ns.cmd}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
