# syntax=docker/dockerfile:1
#
# One image for every host: api, runner, scheduler (pick one with the
# container command, e.g. `command: ["runner"]`). Built in two stages:
#
#   build    compiles the dependency graph first, from the manifests and stub
#            sources only (cached until Cargo.toml/Cargo.lock change), then
#            the workspace's own crates, once, for all host binaries;
#   runtime  distroless (glibc, no shell, no package manager), non-root, with
#            the binaries, the `healthcheck` probe and `configuration/`.
#
# Base images are pinned by tag; override them with build arguments, e.g.
#   docker build --build-arg RUST_IMAGE=rust:1.95-slim-bookworm \
#                --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot .
# (keep both on the same Debian release: the binaries link against its glibc).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

# librdkafka (the Kafka transport) is built from source by rdkafka-sys:
# ./configure + make, C and C++ (no cmake; zlib comes from libz-sys). The
# slim image has gcc but neither make nor g++. Versions are those of the
# image's Debian release (pinned through RUST_IMAGE).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ \
 && rm -rf /var/lib/apt/lists/*

# 1. Dependencies only. Stub sources stand in for the workspace's crates so
#    this layer depends on nothing but the manifests and the lock file.
#    Every workspace member's manifest is needed (cargo loads the whole
#    workspace), and every target a manifest declares by name needs a file
#    (saga's [[test]] kafka; migration's [[bin]] migrate);
#    scripts/check-docker.sh checks both.
COPY Cargo.toml Cargo.lock ./
COPY saga/Cargo.toml saga/
COPY orders/Cargo.toml orders/
COPY entity/Cargo.toml entity/
COPY migration/Cargo.toml migration/
COPY hosts/Cargo.toml hosts/
COPY bench/Cargo.toml bench/
RUN mkdir -p saga/src saga/tests orders/src entity/src migration/src hosts/src/bin bench/src \
 && for lib in saga orders entity migration hosts; do echo '' > "$lib/src/lib.rs"; done \
 && for bin in migration/src/main.rs bench/src/main.rs hosts/src/bin/api.rs hosts/src/bin/runner.rs \
               hosts/src/bin/scheduler.rs hosts/src/bin/healthcheck.rs hosts/src/bin/embedded.rs; do \
      echo 'fn main() {}' > "$bin"; \
    done \
 && echo '' > saga/tests/kafka.rs \
 && cargo build --release --locked -p hosts --bins \
 && rm -rf saga/src saga/tests orders/src entity/src migration/src hosts/src bench/src

# 2. The workspace's own crates. `touch` makes every real source newer than
#    the stubs' build outputs, so cargo rebuilds exactly these crates. (bench
#    and saga's tests keep their stubs: they are not built here.)
COPY saga/src saga/src
COPY orders/src orders/src
COPY entity/src entity/src
COPY migration/src migration/src
COPY hosts/src hosts/src
RUN mkdir -p saga/tests bench/src \
 && echo '' > saga/tests/kafka.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && find saga/src orders/src entity/src migration/src hosts/src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p hosts --bins \
 && mkdir -p /out \
 && cp target/release/api target/release/runner target/release/scheduler \
       target/release/healthcheck /out/

FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="order-saga" \
      org.opencontainers.image.description="order-saga hosts: api, runner, scheduler (RabbitMQ or Kafka: transport.kind)"
WORKDIR /app
COPY --from=build /out/api /out/runner /out/scheduler /out/healthcheck /usr/local/bin/
# instance.json and secrets.example.json (secrets.json never enters the
# image: see .dockerignore). Mount your own folder over it or set APP__...
COPY configuration/ /app/configuration/
ENV APP_CONFIG_DIR=/app/configuration \
    APP__API__LISTEN=0.0.0.0:8080
# distroless's "nonroot" user (uid 65532); numeric so Kubernetes can verify it.
USER 65532:65532
# 8080: the api; 9091 / 9092: the runner's / scheduler's /metrics and
# /health/* (set APP__MONITORING__RUNNER_LISTEN / SCHEDULER_LISTEN to
# 0.0.0.0:<port> to reach them from outside the container).
EXPOSE 8080 9091 9092
# For the api (readiness: database, broker, outbox lag); compose gives the
# runner and the scheduler their own (their /health/ready on 9091 / 9092).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/healthcheck", "http://127.0.0.1:8080/health/ready"]
CMD ["api"]
