# syntax=docker/dockerfile:1.7
#
# elasticmoe serving image (CUDA): Ray 2.60 + Python 3.11 + torch 2.13.0 (CUDA 12.8 build)
# + elasticmoe and its pinned dependencies. Used by the Helm chart (KubeRay head and GPU
# worker pods) and by cluster/aws.yaml (`docker:`).
#
#   docker build -t ghcr.io/elasticmoe/elasticmoe:0.1.0 .
#   docker push ghcr.io/elasticmoe/elasticmoe:0.1.0
#
# The base is Ray's own GPU image: it already holds ray[serve] at the pinned version, the
# `ray` user (uid 1000, gid 100) that the chart's securityContext runs as, and the tools
# KubeRay's probes call (wget). The NVIDIA driver comes from the host (>= 570 for CUDA 12.8).
# CI does not build this image.

ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

LABEL org.opencontainers.image.title="elasticmoe" \
      org.opencontainers.image.description="Elastic Ray-based serving of Mixture-of-Experts LLMs" \
      org.opencontainers.image.licenses="Apache-2.0"

USER ray
WORKDIR /home/ray

# HF_HOME: model weights come from a volume mounted at /models, in Hugging Face cache
# layout (/models/hub/models--org--name/snapshots/...) or as plain checkpoint directories.
# TRITON_CACHE_DIR: compiled kernels; the Helm chart points it at a volume of the pod.
# RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: Serve's gRPC proxy refuses a message over 4 MiB (Ray's default: 2 GiB, handed to
# a gateway before its API key check), however Ray is started in the image; the chart's pod env and the cluster
# configs' `ray start` commands set it too (theirs wins).
# RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: Serve's HTTP proxy refuses a body over 4 MiB (413), which it would
# otherwise read into memory whole before a gateway's API key check (elasticmoe/rpc/serve_http_proxy.py); likewise.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    TRITON_CACHE_DIR=/home/ray/.cache/triton \
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=4194304 \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=elasticmoe.rpc.serve_http_proxy:middlewares

# 1) torch from PyTorch's CUDA index first (its own layer: ~4 GB that rarely changes).
#    pip then treats elasticmoe's `torch==2.13.0` as satisfied by 2.13.0+cu128.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2) elasticmoe (not editable) with its pinned dependencies from PyPI. The generated gRPC
#    code is committed; `generate --check` fails the build if it is stale against protos/.
COPY --chown=ray:users . /tmp/elasticmoe-src
RUN pip install /tmp/elasticmoe-src \
 && cd /tmp/elasticmoe-src && python -m elasticmoe.rpc.generate --check && cd / \
 && rm -rf /tmp/elasticmoe-src \
 && python -c "import ray, torch, elasticmoe.config, elasticmoe.rpc.generation_pb2_grpc; \
assert ray.__version__ == '2.60.0', ray.__version__; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert torch.version.cuda, 'torch is not a CUDA build'" \
 && python -c "import elasticmoe.kernels.cpu_gemm as m; assert m._SRC.is_file(), 'package data missing: ' + str(m._SRC)"

# Ray's ports (KubeRay and `ray up` pass their own commands; nothing to run by default):
# GCS 6379, dashboard 8265, client 10001, metrics 8080, Serve HTTP 8000, Serve gRPC 9000.
EXPOSE 6379 8265 10001 8080 8000 9000
