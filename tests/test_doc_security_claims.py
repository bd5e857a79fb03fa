"""The numbers docs/SECURITY.md states about request bounds and the shards' frame listener and gRPC port are the
code's defaults (tests/test_request_costs.py, tests/test_frame_handshakes.py, tests/test_shard_connections.py and
tests/test_security_claims.py test the behaviour; tests/test_doc_claims.py: key reloads and certificate lifetimes).
In-process and fast: no Ray, no model."""

from __future__ import annotations

import functools
import inspect

from tests.doc_util import REPO
from tests.shard_util import files, halves  # noqa: F401 - fixtures


@functools.cache
def _doc() -> str:
    return " ".join((REPO / "docs" / "SECURITY.md").read_text().split())


def test_each_request_bound_the_doc_names_has_its_default():
    """"`limits.max_prompt_bytes` (UTF-8 bytes of a text prompt, 1 MiB; ...", "`limits.max_stop_strings` (16)", ...:
    each phrase, and the app's default behind it (what a Serve config that leaves `limits` out runs with)."""
    from elasticmoe.config import Limits
    from elasticmoe.engine.validation import RequestLimits

    said = {"max_prompt_bytes": ("`limits.max_prompt_bytes` (UTF-8 bytes of a text prompt, 1 MiB;", 1 << 20),
            "max_stop_strings": ("`limits.max_stop_strings` (16)", 16),
            "max_stop_len": ("of at most `limits.max_stop_len` characters (256)", 256),
            "max_request_id_len": ("`limits.max_request_id_len` (256 characters)", 256),
            "max_logprobs": ("`limits.max_logprobs` (top logprobs per token, 20)", 20),
            "max_stop_token_ids": ("`limits.max_stop_token_ids` (16)", 16),
            "max_logit_bias": ("`limits.max_logit_bias` (1024 entries,", 1024),
            "max_body_bytes": ("A client request is at most 4 MiB at every entry point, refused before the gateway "
                               "reads it: HTTP by `limits.max_body_bytes` (413)", 4 << 20)}
    defaults = Limits()
    for field, (phrase, value) in said.items():
        assert phrase in _doc(), field
        assert getattr(defaults, field) == value, field
    assert "`limits.max_prompt_tokens` (default `max_model_len - 1`)" in _doc()
    assert defaults.max_prompt_tokens is None and "max_model_len - 1" in Limits.model_fields[
        "max_prompt_tokens"].description
    assert "An HTTP body's nesting is at most 32 levels" in _doc()
    assert RequestLimits.of(defaults).max_json_depth == 32


def test_an_error_names_at_most_200_characters_and_long_prompts_leave_the_loop():
    """"an error names at most 200 characters of a path or URL" (the one clip every error path goes through); "A
    prompt of 16k characters or more ... is tokenized on one worker thread"."""
    from elasticmoe.engine.validation import clip
    from elasticmoe.gateway import tokenizing

    assert "an error names at most 200 characters of a path or URL" in _doc()
    assert inspect.signature(clip).parameters["limit"].default == 200 and len(clip("k" * 5000)) <= 200
    assert "A prompt of 16k characters or more" in _doc() and tokenizing.OFF_LOOP_CHARS == 16 * 1024
    assert tokenizing._POOL._max_workers == 1  # "on one worker thread"


def test_a_shards_frame_listener_holds_the_connections_the_doc_states(halves):  # noqa: F811
    """"A shard's frame listener serves at most 16 connections ... and holds at most 16 more in their TLS handshake,
    each for up to 10 s": a shard started as ExpertShard starts it (start_server's defaults) has those bounds."""
    from elasticmoe.experts import deployment
    from elasticmoe.rpc import frame_gate

    assert ("A shard's frame listener serves at most 16 connections (more are refused, \"shard busy\") and holds at "
            "most 16 more in their TLS handshake, each for up to 10 s") in _doc()
    listener = halves.servers[0].listener
    assert (listener.max_conns, listener.max_handshakes, frame_gate.HANDSHAKE_S) == (16, 16, 10.0)
    assert "max_streams" not in inspect.getsource(deployment)  # the replica keeps start_server's default


def test_a_shards_grpc_port_holds_the_connections_the_doc_states():
    """"A shard's gRPC port closes a connection that has not finished its mTLS handshake within 10 s and holds at most
    512 connections at once": the options every shard's server is started with (start_server: server_options)."""
    from elasticmoe.experts import shard_server
    from elasticmoe.rpc.options import server_options

    assert ("A shard's gRPC port closes a connection that has not finished its mTLS handshake within 10 s and holds "
            "at most 512 connections at once") in _doc()
    bounds = dict(server_options())
    assert (bounds["grpc.server_handshake_timeout_ms"], bounds["grpc.max_allowed_incoming_connections"]) == (
        10_000, 512)
    assert "options=server_options(" in inspect.getsource(shard_server.start_server)


def test_the_local_ca_is_the_kind_the_doc_names(tmp_path):
    """"ECDSA P-256; CA 10 years, certificate 1 year" (the lifetimes: tests/test_doc_claims.py), and the leaf names
    `elasticmoe-internal`, which the gateway and the controller verify."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from elasticmoe.rpc import tls

    assert "(ECDSA P-256; CA 10 years, certificate 1 year" in _doc()
    assert "verify the shard's certificate (name `elasticmoe-internal`)" in _doc()
    made = tls.local_ca(tmp_path / "tls")
    for path in (made.ca, made.cert):
        key = x509.load_pem_x509_certificate(path.read_bytes()).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1", path.name
    leaf = x509.load_pem_x509_certificate(made.cert.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls.SERVER_NAME == "elasticmoe-internal" and tls.SERVER_NAME in names.get_values_for_type(x509.DNSName)
