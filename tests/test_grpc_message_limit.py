"""Serve's gRPC proxy takes a message of up to 2 GiB by Ray's default (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE) and hands it to a
gateway replica before the API key is checked; every place that starts Ray sets it to 4 MiB, the cap of our own entry
points (HTTP limits.max_body_bytes, the direct_grpc port): the local cluster, each cluster/*.yaml's `ray start`
commands and the chart's Ray pods (head, workers, gateways). The proxy refusing a larger message: the e2e check."""

from __future__ import annotations

from elasticmoe import local_cluster as lc

NAME, LIMIT = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "4194304"


def test_the_limit_is_our_own_entry_points_cap():
    from elasticmoe.config import Limits

    assert lc.GRPC_MAX_MESSAGE_ENV == NAME and str(lc.GRPC_MAX_MESSAGE_BYTES) == LIMIT
    assert Limits().max_body_bytes == lc.GRPC_MAX_MESSAGE_BYTES


def test_ray_env_sets_it_and_an_operators_value_wins(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert lc.ray_env()[NAME] == LIMIT
    monkeypatch.setenv(NAME, "1048576")
    assert lc.ray_env()[NAME] == "1048576"

