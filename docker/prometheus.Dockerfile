# Prometheus from Debian's package, for hosts that reach a Debian mirror but no container registry (CI:
# docker/ci-stack.sh). Same command line and paths as the prom/prometheus image docker-compose.yml names.
# Build context: docker/prometheus (the configuration and alert rules are baked in; compose mounts them too).
ARG BASE=debian:bookworm-slim
# hadolint ignore=DL3006
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus=2.* \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus
COPY prometheus.yml /etc/prometheus/prometheus.yml
COPY rules /etc/prometheus/rules
USER 65534:65534
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
