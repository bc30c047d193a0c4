#!/bin/sh
# Install kubespan-mesh from a built wheel into a fresh venv, the way the images do it (the tests run this
# same script, since base images cannot be pulled on the CI machines).
#   install.sh registry VENV WHEEL   only the registry's dependencies (registry-requirements.txt)
#   install.sh agent    VENV WHEEL   the wheel with all its dependencies
set -eu
mode=$1 venv=$2 wheel=$3
here=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$venv"
case "$mode" in
  registry)
    "$venv/bin/pip" install --no-cache-dir --quiet -r "$here/registry-requirements.txt"
    "$venv/bin/pip" install --no-cache-dir --quiet --no-deps "$wheel"
    ;;
  agent)
    "$venv/bin/pip" install --no-cache-dir --quiet "$wheel"
    ;;
  *)
    echo "usage: $0 registry|agent VENV WHEEL" >&2
    exit 2
    ;;
esac
