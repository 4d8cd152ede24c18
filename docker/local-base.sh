#!/usr/bin/env bash
# A local base image (Debian bookworm + Debian's Python 3.11) for machines that reach Debian's and PyPI's
# package servers but no container registry, as CI does here:
#   docker/local-base.sh [TAG]            # default faceset-base:bookworm; reused when it exists
#   docker build -f docker/Dockerfile --build-arg BASE=faceset-base:bookworm -t faceset:0.1.0 .
# The machine's extra CA certificates and /etc/pip.conf go in, so that pip inside reaches the package
# index the way the machine does. Needs root, debootstrap and a running Docker engine.
set -euo pipefail
TAG="${1:-faceset-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists: reused"
  exit 0
fi
ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
# python3-venv brings pip's wheel (a venv gets pip from it): no python3-pip in the image
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
chroot "$ROOT" update-ca-certificates >/dev/null
if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$ROOT/etc/pip.conf"; fi
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/usr/share/{doc,man,info,locale}/*
tar -C "$ROOT" --numeric-owner -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG"
echo "$TAG built"
