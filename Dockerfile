# multiraft node image.
#   docker build -t multiraft .
#   docker run --ulimit memlock=-1 -p 7001:7001 -p 7101:7101 \
#     -e MULTIRAFT_NODE_ID=1 -e MULTIRAFT_RAFT_ADDR=<this host's IP>:7101 multiraft
# glommio pins (mlocks) a few MiB of io_uring memory per shard and refuses
# to start below a 512 KiB memlock limit: raise it (--ulimit memlock=-1, or
# LimitMEMLOCK in the runtime's service). io_uring must not be blocked by
# the runtime's seccomp profile (Docker 25+ allows it by default).

FROM rust:1.87-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin multiraft

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/multiraft --create-home multiraft
COPY --from=build /src/target/release/multiraft /usr/local/bin/multiraft
USER multiraft
ENV MULTIRAFT_API_ADDR=0.0.0.0:7001 \
    MULTIRAFT_DATA_DIR=/var/lib/multiraft/data \
    RUST_LOG=info
VOLUME /var/lib/multiraft
EXPOSE 7001 7101
STOPSIGNAL SIGTERM
ENTRYPOINT ["multiraft"]
CMD ["serve"]
