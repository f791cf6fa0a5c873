# syntax=docker/dockerfile:1
#
# derp-relay container image.
#
#   docker build -t derp-relay .
#   docker run -d --name derp-relay -p 8443:8443 \
#     -v "$PWD/keys:/etc/derp-relay:ro" \
#     -v derp-relay-data:/var/lib/derp-relay \
#     derp-relay
#
# The relay speaks plain HTTP on 8443; put a TLS terminator in front (see
# deploy/nginx, deploy/caddy, fly.toml, deploy/kubernetes).
#
# Why a glibc build on distroless/cc rather than a static musl binary: the
# relay allocates per batch on many threads at once, where musl's allocator is
# far slower than glibc's; and aws-lc (the TLS provider of the `probe`
# subcommand) then builds with the native C toolchain, no cross compiler.
# Builder and runtime are both Debian 12 (glibc 2.36), so every glibc symbol
# version the binary links against exists at run time.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Cargo.toml keeps line tables in release builds for local profiling; an image
# has no use for them and ships smaller without.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the registry and build tree between builds, so a source
# change rebuilds only this crate.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin derp-relay \
 && install -D -m 0755 target/release/derp-relay /out/derp-relay \
 && install -d -m 0750 /out/state/derp-relay

# Fly.io mounts volumes owned by root, and a distroless image has no shell to
# chown one at start, so the Fly deployment builds this root variant
# (fly.toml: build-target = "fly"). There the Firecracker VM is the boundary.
# distroless calls its root variant "latest"; like ":nonroot" below it follows
# Debian 12 security updates. Pin both by digest for reproducible images.
# hadolint ignore=DL3007
FROM gcr.io/distroless/cc-debian12:latest AS fly
COPY --from=builder /out/derp-relay /usr/local/bin/derp-relay
COPY --from=builder /out/state/ /var/lib/
EXPOSE 8443
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/derp-relay"]
CMD ["--allowed-keys-file", "/etc/derp-relay/allowed-keys.txt", "--data-dir", "/var/lib/derp-relay", "--addr", ":8443"]

# The default image: the last stage, running as distroless's nonroot user
# (uid/gid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/derp-relay /usr/local/bin/derp-relay
# A new named volume starts as a copy of this directory, ownership included,
# so the relay can write its key and bindings without any chown step. A bind
# mount instead must be writable by uid 65532 (chown 65532:65532 DIR).
# The directory is copied as an entry of /out/state/ so that --chown applies
# to it (and not to /var/lib, which already exists).
COPY --from=builder --chown=65532:65532 /out/state/ /var/lib/
USER 65532:65532
VOLUME ["/var/lib/derp-relay"]
EXPOSE 8443
# SIGTERM starts the graceful drain (up to 30 s); give `docker stop` -t 45.
STOPSIGNAL SIGTERM
# Exec form: distroless has no shell. The check assumes the default port
# 8443; with another --addr, override it (`healthcheck --url ...`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/derp-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/derp-relay"]
# ACL mode by default: mount a directory holding allowed-keys.txt at
# /etc/derp-relay (a directory, not the file: a single-file bind mount keeps
# the old inode when an editor replaces the file, and live reload never sees
# the change). Replace CMD with `--open-relay ...` to admit anyone.
CMD ["--allowed-keys-file", "/etc/derp-relay/allowed-keys.txt", "--data-dir", "/var/lib/derp-relay", "--addr", ":8443"]
