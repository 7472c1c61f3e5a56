#!/usr/bin/env bash
# Builds a pinned helm binary from source with `go install`, through the Go
# module proxy, into .cache/helm/<version>/bin. The tests of the Helm chart run
# this binary. The first build takes a few minutes on two cores. Later calls
# find the binary and return at once.
#
# Usage: dev/helm.sh install|path|help
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

HELM_VERSION="${AUTOPULL_HELM_VERSION:-v4.3.2}"
CACHE_DIR="$ROOT/.cache/helm"
VERSION_DIR="$CACHE_DIR/$HELM_VERSION"
BIN_DIR="$VERSION_DIR/bin"
HELM_BIN="$BIN_DIR/helm"
BUILD_LOG="$VERSION_DIR/build.log"

log() {
    printf 'helm.sh: %s\n' "$*" >&2
}

die() {
    printf 'helm.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: dev/helm.sh COMMAND

Commands:
  install  Build helm $HELM_VERSION into .cache/helm/$HELM_VERSION/bin unless it
           is there, then print the binary's path.
  path     Print the binary's path; exit 1 if it has not been built.

Environment:
  AUTOPULL_HELM_VERSION  helm 4 release to build, as v4.MINOR.PATCH (default v4.3.2)

The build needs Go (the go command on PATH) and the Go module proxy.
EOF
}

# Only helm 4 is built here: a helm 3 binary built by `go install` needs more
# linker flags (the Kubernetes version it assumes) than this script sets.
validate_version() {
    if ! [[ "$HELM_VERSION" =~ ^v4\.[0-9]+\.[0-9]+$ ]]; then
        die "AUTOPULL_HELM_VERSION=$HELM_VERSION is not a helm 4 release such as v4.3.2"
    fi
}

# Succeeds when the binary exists and reports the pinned version.
installed() {
    [[ -x "$HELM_BIN" ]] || return 1
    [[ "$("$HELM_BIN" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]
}

# Takes an exclusive lock for the rest of the script, so that two test
# processes do not build into the same folder at once.
lock_version_dir() {
    mkdir -p "$VERSION_DIR"
    if ! command -v flock >/dev/null 2>&1; then
        return 0
    fi
    exec 9>"$VERSION_DIR/.lock"
    if ! flock -w 1200 9; then
        die "timed out after 1200s waiting for another dev/helm.sh to finish building in $VERSION_DIR"
    fi
}

build() {
    if ! command -v go >/dev/null 2>&1; then
        die "go not found on PATH. Building helm needs Go, at least the version in the go.mod of helm $HELM_VERSION (1.26 for v4.3.2)."
    fi

    # `go install` names no version of its own in the binary, so the version
    # string is set the way helm's release Makefile sets it.
    local module="helm.sh/helm/v4"
    local staging="$VERSION_DIR/bin.partial"
    rm -rf "$staging"
    mkdir -p "$staging"

    log "building helm $HELM_VERSION with $(go version | cut -d' ' -f3); the first build takes a few minutes"
    local started=$SECONDS
    if ! GOBIN="$staging" CGO_ENABLED=0 go install -trimpath \
        -ldflags "-s -w -X $module/internal/version.version=$HELM_VERSION" \
        "$module/cmd/helm@$HELM_VERSION" >"$BUILD_LOG" 2>&1; then
        tail -n 30 "$BUILD_LOG" >&2
        rm -rf "$staging"
        die "go install $module/cmd/helm@$HELM_VERSION failed (full output in $BUILD_LOG). Check AUTOPULL_HELM_VERSION and that the Go module proxy is reachable."
    fi

    rm -rf "$BIN_DIR"
    mv "$staging" "$BIN_DIR"
    if ! installed; then
        die "the built $HELM_BIN does not report version $HELM_VERSION; see $BUILD_LOG"
    fi
    log "built helm $HELM_VERSION in $((SECONDS - started))s: $HELM_BIN"
}

cmd_install() {
    validate_version
    if installed; then
        printf '%s\n' "$HELM_BIN"
        return 0
    fi
    lock_version_dir
    # Another process may have finished the build while this one waited.
    if ! installed; then
        build
    fi
    printf '%s\n' "$HELM_BIN"
}

cmd_path() {
    validate_version
    if ! installed; then
        log "helm $HELM_VERSION is not built yet; run 'bash dev/helm.sh install'"
        exit 1
    fi
    printf '%s\n' "$HELM_BIN"
}

main() {
    local command="${1:-help}"
    case "$command" in
        install) cmd_install ;;
        path) cmd_path ;;
        help | -h | --help) usage ;;
        *)
            usage >&2
            die "unknown command '$command'"
            ;;
    esac
}

main "$@"
