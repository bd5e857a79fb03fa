"""Serve's gRPC servicer hook: registers Generation, maps a replica's death to UNAVAILABLE / 503, adds retry-after.

Serve's proxy imports the functions named in `grpc_options.grpc_servicer_functions` and calls each with its gRPC
server. Ours adds the Generation servicer and, in that same proxy process, wraps Serve's error mapping: a request
whose replica died mid-flight (`RayActorError`: the process was killed, its node lost) is by default INTERNAL / 500,
which tells a client the request itself was bad. It is a transient fault that a retry survives (Serve routes the
retry to a live replica), so we answer UNAVAILABLE on gRPC and 503 on HTTP. Every other status is left as is.
Serve also drops the trailing metadata of a call that ends in an error, so a refusal for capacity
(RESOURCE_EXHAUSTED, the gateway's or Serve's own backpressure) gets its `retry-after: 1` here.
"""

from __future__ import annotations

import logging

import grpc

from elasticmoe.rpc.generation_wire import add_generation_to_server

log = logging.getLogger(__name__)
REPLICA_DIED = "the gateway replica serving this request died; retry the request"
_PATCHED = "_elasticmoe_replica_death"
RETRY_AFTER_S = "1"  # seconds, as the gateway's own refusals say


def add_generation_servicer(servicer, server) -> None:
    """`grpc_servicer_functions` entry: the Generation servicer (requests read by generation_wire.read_request, which
    Serve's proxy keeps as the deserializer: a malformed one reaches the replica, which refuses it naming the field)
    plus the replica-death mapping."""
    add_generation_to_server(servicer, server)
    install_replica_death_mapping()


def replica_died(exc: BaseException) -> bool:
    """Whether `exc` says the replica (actor) serving the request is gone, not that the request failed."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


def _wrap(original, code):
    from ray.serve._private.proxy_request_response import ResponseStatus

    def status(exc, request_timeout_s, request_id):
        if replica_died(exc):
            return ResponseStatus(code=code, is_error=True, message=REPLICA_DIED)
        return original(exc, request_timeout_s, request_id)

    setattr(status, _PATCHED, True)
    return status


def _with_retry_after(original):
    def set_status(context, status):
        original(context, status)  # sets Serve's code unless the replica set one: context.code() is what is sent
        if context.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            context.set_trailing_metadata([("retry-after", RETRY_AFTER_S)])

    setattr(set_status, _PATCHED, True)
    return set_status


def install_replica_death_mapping() -> bool:
    """Wrap the proxy's gRPC and HTTP status mappings (and its status setter) once; False (with a warning) if
    Serve's internals moved."""
    try:
        from ray.serve._private import proxy
    except ImportError as e:  # a Serve without this module: keep its own mapping
        log.warning("Serve's proxy module not found (%s): a dead replica stays INTERNAL / 500", e)
        return False
    done = True
    setter = getattr(proxy, "set_grpc_code_and_details", None)
    if setter is None:
        log.warning("Serve's proxy has no set_grpc_code_and_details: refusals carry no retry-after")
        done = False
    elif not getattr(setter, _PATCHED, False):
        setattr(proxy, "set_grpc_code_and_details", _with_retry_after(setter))
    for name, code in (("get_grpc_response_status", grpc.StatusCode.UNAVAILABLE), ("get_http_response_status", 503)):
        original = getattr(proxy, name, None)
        if original is None:
            log.warning("Serve's proxy has no %s: a dead replica keeps Serve's status there", name)
            done = False
        elif not getattr(original, _PATCHED, False):
            setattr(proxy, name, _wrap(original, code))
    return done
