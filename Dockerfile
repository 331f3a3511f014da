# One image for both halves of the operator (see README, "Install / container image"):
#   controller: runs as the image's user (uid 65532) on a read-only root filesystem;
#   agent:      the Job the controller builds runs it as root, privileged, with the host's /dev.
# BASE must be a Debian-based CPython 3.11 image (constraints.txt is resolved for CPython 3.11
# on Linux); CI builds it offline from a local base (scripts/build-image).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_CONFIG_FILE=/run/secrets/pipconf
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
# The optional `pipconf` secret carries a builder's own index settings (scripts/build-image
# passes the host's); without it pip uses its defaults.
RUN --mount=type=secret,id=pipconf \
    python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --quiet --no-deps --wheel-dir /wheels .

FROM ${BASE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/imagestream-operator/imagestream-operator
LABEL org.opencontainers.image.title="imagestream-operator" \
      org.opencontainers.image.description="Stream compressed OS images onto node disks: CLI, node agent and Kubernetes controller" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Exactly the locked versions: the wheel's dependencies are resolved under constraints.txt.
# The byte-compiled files are written now, as the read-only root filesystem will not take them;
# pip and setuptools leave the runtime environment (nothing imports them, and less to patch).
# (COPY --from, not a bind mount from the stage: buildah 1.28 does not mount a cached stage.)
# sfdisk (Debian's fdisk package) relocates a COSI disk's backup GPT to the disk's end; nsenter
# (util-linux, in every Debian base) runs an extension refresh in the node's mount namespace.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends fdisk \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN --mount=type=secret,id=pipconf \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    python3 -m venv /opt/imagestream \
 && PIP_CONFIG_FILE=/run/secrets/pipconf PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    /opt/imagestream/bin/pip install --quiet --constraint /tmp/constraints.txt /tmp/wheels/*.whl \
 && rm -r /tmp/wheels \
 && /opt/imagestream/bin/pip uninstall --quiet --yes pip setuptools \
 && groupadd --gid 65532 imagestream \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin imagestream
ENV PATH=/opt/imagestream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 65532:65532
WORKDIR /
ENTRYPOINT ["imagestream"]
CMD ["--help"]
