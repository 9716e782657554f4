#!/usr/bin/env bash
# Build the serving image and run the compose stack (CPU profile: service + Prometheus) with podman, without
# any container registry or Python index: the base image is a Debian rootfs made by debootstrap, the Python
# dependencies come from a wheelhouse pip downloads on the host (pip's configured indexes; on the CI machine they
# are on its disk), and Prometheus is Debian's package on that same base. Used by tests/test_container.py.
#
#   docker/ci-stack.sh build          # base image, wheelhouse, soap-serving:cpu, soap-prometheus:debian
#   docker/ci-stack.sh up             # build, then `docker-compose up -d` (soap-cpu + prometheus)
#   docker/ci-stack.sh compose ARGS   # docker-compose ARGS against the stack (ps, logs, stop, ...)
#   docker/ci-stack.sh check-disk     # exit 1, saying why, when the build would run out of disk
#   docker/ci-stack.sh down           # `docker-compose down -v`, then stop the podman API service
#
# Needs root, podman (+ runc, netavark, iptables), debootstrap, docker-compose 1.29 (.ci/run installs them) and network
# access to a Debian mirror. Environment:
#   SOAP_CI_CACHE        cache folder (git-ignored): rootfs tarball + wheelhouse; default .cache/containers
#   DEBIAN_MIRROR        default: the first Debian mirror of this machine's apt sources
#   TORCH_VERSION        torch pinned in the wheelhouse (default 2.13.0: the CPU build on the CI machines' disk,
#                        ~190 MB, where 2.14.1 there is the CUDA build, ~3 GB of wheels and a 6 GB image)
#   SOAP_CI_MIN_FREE_GB  free disk the build needs in the cache and podman's storage (default 5; image ~1.5 GB)
#   SOAP_PUBLISH_PORT, PROMETHEUS_PORT   host ports (127.0.0.1) of the service and Prometheus (8000 / 9090)
#   COMPOSE_PROJECT_NAME default soapci
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

CACHE=${SOAP_CI_CACHE:-$REPO/.cache/containers}
SUITE=bookworm
BASE_IMAGE=localhost/soap-base:$SUITE
SERVICE_IMAGE=localhost/soap-serving:cpu
PROMETHEUS_IMAGE=localhost/soap-prometheus:debian
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MIN_FREE_GB=${SOAP_CI_MIN_FREE_GB:-5}
SOCKET=$CACHE/podman.sock
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-soapci}

log() { printf '[ci-stack %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

debian_mirror() {
  if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
  # deb822 (`URIs: ...`) or one-line (`deb URI suite ...`) sources; the main archive, not security.
  # (Some of these files do not exist: `cat` fails, which must not end the script under pipefail.)
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
    | sed -nE 's/^(URIs:|deb(\s+\[[^]]*\])?)\s+(\S+).*/\3/p' | { grep -E '/debian/?$' || true; } | head -n1
}

build_base() {
  if podman image exists "$BASE_IMAGE"; then return; fi
  local tarball=$CACHE/rootfs-$SUITE.tar
  if [[ ! -s $tarball ]]; then
    local mirror rootfs
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || { echo "no Debian mirror in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    log "debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$mirror" \
      >"$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # A venv on PATH gives `python` and `pip` the way python:*-slim images do (Debian's python is
    # externally managed: PEP 668).
    chroot "$rootfs" python3 -m venv /opt/venv
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  log "import $BASE_IMAGE"
  podman import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

# The requirements of the image's `pip install`: pyproject's dependencies (+ the extras the Dockerfile installs),
# torch pinned, and the build backend (pip builds the editable install without an index).
requirements() {
  python3 - "$TORCH_VERSION" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
dockerfile = open("docker/Dockerfile").read()
extras = sorted({e for group in re.findall(r"-e \"?\.\[([\w,]+)\]", dockerfile) for e in group.split(",")})
reqs = list(project["project"]["dependencies"])
seen = set()
while extras:  # an extra may name others through the package itself: serve = ["soap-serving[core]", ...]
    extra = extras.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for req in project["project"]["optional-dependencies"][extra]:
        if req.startswith(project["project"]["name"] + "["):
            extras += req.split("[", 1)[1].split("]", 1)[0].split(",")
        else:
            reqs.append(req)
# Only torch is pinned: the serving extra has no torchvision (a pin of it would have to match the torch release).
named = {re.match(r"[\w.-]+", r).group(0) for r in reqs}
assert "torchvision" not in named, "the image installs torchvision: pin it to match TORCH_VERSION"
reqs = [r for r in reqs if re.match(r"[\w.-]+", r).group(0) != "torch"] + [f"torch=={sys.argv[1]}"]
reqs += [*project["build-system"]["requires"], "wheel"]
print("\n".join(reqs))
EOF
}

# The wheelhouse's key: a hash of its requirements (the service image is labelled with the one it was built from).
WHEELHOUSE_KEY=
build_wheelhouse() {
  local wheels=$CACHE/wheelhouse reqs key
  reqs=$(requirements)
  key=$(printf '%s\n' "$reqs" | sha256sum | cut -c1-16)
  WHEELHOUSE_KEY=$key
  if [[ $(cat "$wheels/.key" 2>/dev/null) != "$key" ]]; then
    log "pip download into $wheels"
    rm -rf "$wheels" && mkdir -p "$wheels"
    printf '%s\n' "$reqs" >"$wheels/requirements.txt"
    python3 -m pip download -q --only-binary=:all: --python-version 3.11 -d "$wheels" -r "$wheels/requirements.txt"
    echo "$key" >"$wheels/.key"
  fi
}

# A build that runs out of disk half way fails deep inside podman ("no space left on device" while committing a
# layer): say so up front instead.
check_free_disk() {
  local storage avail_kb
  storage=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
  mkdir -p "$storage"
  for dir in "$CACHE" "$storage"; do
    avail_kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
    if (( avail_kb < MIN_FREE_GB * 1024 * 1024 )); then
      echo "ci-stack: $dir has $((avail_kb / 1024)) MiB free; the build needs ${MIN_FREE_GB} GiB (SOAP_CI_MIN_FREE_GB)" >&2
      exit 1
    fi
  done
}

build_images() {
  mkdir -p "$CACHE"
  check_free_disk
  build_base
  build_wheelhouse
  log "build $SERVICE_IMAGE"
  # The layer cache does not see the volume's content: other wheels, no cache.
  local fresh=()
  if [[ $(podman image inspect -f '{{index .Labels "soap.wheelhouse"}}' "$SERVICE_IMAGE" 2>/dev/null) != "$WHEELHOUSE_KEY" ]]
  then fresh=(--no-cache); fi
  # Docker image format: the OCI format has no HEALTHCHECK. The wheelhouse is a build-time volume (not copied).
  podman build -q "${fresh[@]}" --label "soap.wheelhouse=$WHEELHOUSE_KEY" --format docker -f docker/Dockerfile \
    -t "$SERVICE_IMAGE" -v "$CACHE/wheelhouse:/wheels:ro" \
    --build-arg VARIANT=cpu --build-arg CPU_BASE="$BASE_IMAGE" --build-arg TORCH_CPU_INDEX= \
    --build-arg PIP_SOURCE=wheelhouse . >/dev/null
  log "build $PROMETHEUS_IMAGE"
  podman build -q --format docker --network host -f docker/prometheus.Dockerfile -t "$PROMETHEUS_IMAGE" \
    --build-arg BASE="$BASE_IMAGE" docker/prometheus >/dev/null
  podman image prune -f >/dev/null  # the previous builds' images (GBs each)
  log "images built"
}

# docker-compose talks to podman's Docker-compatible API on a socket of its own.
start_api() {
  export DOCKER_HOST=unix://$SOCKET
  if curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; then return; fi
  mkdir -p "$CACHE"
  rm -f "$SOCKET"
  nohup podman system service --time=0 "unix://$SOCKET" >"$CACHE/podman-service.log" 2>&1 &
  echo $! >"$CACHE/podman-service.pid"
  for _ in $(seq 100); do
    curl -sf --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "podman system service did not answer on $SOCKET" >&2
  exit 1
}

stop_api() {
  local pidfile=$CACHE/podman-service.pid
  if [[ -f $pidfile ]]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile" "$SOCKET"
  fi
}

compose() {
  start_api
  # docker/podman/compose.sandbox.yml: the resource limits the CI sandbox allows (it refuses to raise them).
  COMPOSE_FILE=docker-compose.yml:docker/compose.cpu.yml:docker/podman/compose.sandbox.yml COMPOSE_PROFILES=cpu \
    SOAP_CPU_IMAGE=$SERVICE_IMAGE PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE \
    docker-compose "$@"
}

case ${1:-} in
  build) build_images ;;
  check-disk) mkdir -p "$CACHE"; check_free_disk ;;
  up)
    build_images
    # Grafana is not packaged for Debian: the stack runs without it (its dashboard is validated by tests).
    compose up -d --no-build soap-cpu prometheus
    ;;
  compose) shift; compose "$@" ;;
  down) compose down -v --remove-orphans; stop_api ;;
  *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
