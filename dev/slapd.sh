#!/usr/bin/env bash
# A private OpenLDAP slapd for development and tests. It has its own cn=config
# and mdb database in a data directory, listens on 127.0.0.1 only, and never
# touches the system slapd service or its database in /var/lib/ldap.
#
# Usage: dev/slapd.sh install|start|stop|status|reset|help
# Run `dev/slapd.sh help` for the environment variables it reads.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PORT="${AUTOPULL_SLAPD_PORT:-3890}"
DATA_DIR="${AUTOPULL_SLAPD_DATA:-$ROOT/.cache/slapd/run-$PORT}"
if [[ "$DATA_DIR" != /* ]]; then
    DATA_DIR="$PWD/$DATA_DIR"
fi
DIRECTORY_LDIF="${AUTOPULL_SLAPD_LDIF:-$ROOT/dev/slapd/directory.ldif}"
START_TIMEOUT_S="${AUTOPULL_SLAPD_START_TIMEOUT:-20}"
STOP_TIMEOUT_S="${AUTOPULL_SLAPD_STOP_TIMEOUT:-10}"

# Debian's slapd package puts its programs, schemas and modules here.
SBIN_DIR="${AUTOPULL_SLAPD_SBIN:-/usr/sbin}"
SCHEMA_DIR="${AUTOPULL_SLAPD_SCHEMAS:-/etc/ldap/schema}"
MODULE_DIR="${AUTOPULL_SLAPD_MODULES:-/usr/lib/ldap}"
SLAPD="$SBIN_DIR/slapd"
SLAPADD="$SBIN_DIR/slapadd"

CONFIG_TEMPLATE="$ROOT/dev/slapd/config.ldif"
AUTOPULL_SCHEMA="$ROOT/dev/slapd/autopull-schema.ldif"
SUFFIX="dc=autopull,dc=test"

CONFIG_DIR="$DATA_DIR/slapd.d"
DB_DIR="$DATA_DIR/db"
PID_FILE="$DATA_DIR/slapd.pid"
LOG_FILE="$DATA_DIR/slapd.log"
LOADED_MARKER="$DATA_DIR/loaded"
# Present in every data directory this script created. `reset` deletes only
# directories that contain it.
DATA_MARKER="$DATA_DIR/.autopull-slapd-data"
URL="ldap://127.0.0.1:$PORT/"

log() {
    printf 'slapd.sh: %s\n' "$*" >&2
}

die() {
    printf 'slapd.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: dev/slapd.sh COMMAND

Commands:
  install  Install Debian's slapd and ldap-utils packages with apt-get unless
           slapd, slapadd and ldapwhoami are already there. Needs root or sudo.
  start    Create the configuration and load the test directory on the first
           start, then start slapd in the background on 127.0.0.1.
           Exits 0 at once when this script's slapd already runs there.
  stop     Stop slapd (SIGTERM, then SIGKILL after the stop timeout).
  status   Print the LDAP URL and exit 0 if slapd accepts a bind, else exit 1.
  reset    Stop slapd and delete its data directory.

Environment:
  AUTOPULL_SLAPD_PORT           port on 127.0.0.1 (default 3890)
  AUTOPULL_SLAPD_DATA           data directory (default .cache/slapd/run-<port>)
  AUTOPULL_SLAPD_LDIF           entries loaded on the first start
                                (default dev/slapd/directory.ldif)
  AUTOPULL_SLAPD_START_TIMEOUT  seconds to wait for slapd to accept a bind (default 20)
  AUTOPULL_SLAPD_STOP_TIMEOUT   seconds to wait for a clean exit (default 10)
  AUTOPULL_SLAPD_SBIN           folder of slapd and slapadd (default /usr/sbin)
  AUTOPULL_SLAPD_SCHEMAS        folder of the LDIF schemas (default /etc/ldap/schema)
  AUTOPULL_SLAPD_MODULES        folder of the slapd modules (default /usr/lib/ldap)

The directory's suffix is $SUFFIX. The connector binds as
cn=reader,ou=services,$SUFFIX with the password reader-secret.
EOF
}

validate_settings() {
    if ! [[ "$PORT" =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); then
        die "AUTOPULL_SLAPD_PORT=$PORT is not a valid TCP port (expected 1-65535)"
    fi
    if ! [[ "$START_TIMEOUT_S" =~ ^[0-9]+$ && "$STOP_TIMEOUT_S" =~ ^[0-9]+$ ]]; then
        die "AUTOPULL_SLAPD_START_TIMEOUT and AUTOPULL_SLAPD_STOP_TIMEOUT must be whole seconds"
    fi
}

installed() {
    [[ -x "$SLAPD" && -x "$SLAPADD" ]] && command -v ldapwhoami >/dev/null 2>&1
}

require_installed() {
    if ! installed; then
        die "slapd, slapadd or ldapwhoami was not found: run 'bash dev/slapd.sh install' (Debian packages slapd and ldap-utils)"
    fi
}

# ---------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------

cmd_install() {
    if installed; then
        log "slapd and ldap-utils are already installed"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        die "apt-get was not found: install OpenLDAP's slapd, slapadd and the ldap-utils client programs with this system's package manager"
    fi

    local -a as_root=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || die "installing packages needs root: run this command as root or install sudo"
        as_root=(sudo)
    fi

    # The package scripts would start the system slapd on port 389. A
    # policy-rc.d that exits 101 makes invoke-rc.d skip starting services. It is
    # added only when none exists and removed again afterwards.
    local policy=/usr/sbin/policy-rc.d
    local added_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
        "${as_root[@]}" chmod 755 "$policy"
        added_policy=1
        # shellcheck disable=SC2064  # the command is fixed when the trap is set.
        trap "${as_root[*]} rm -f $policy" EXIT
    fi

    local started=$SECONDS
    log "installing slapd and ldap-utils with apt-get"
    # Another apt-get on the machine holds the package lock for a while; wait for
    # it instead of failing at once.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends slapd ldap-utils
    if ((added_policy)); then
        "${as_root[@]}" rm -f "$policy"
        trap - EXIT
    fi
    installed || die "apt-get finished, but $SLAPD, $SLAPADD or ldapwhoami is still missing"
    log "installed slapd and ldap-utils in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------
# Process checks
# ---------------------------------------------------------------------------

process_alive() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie still passes kill -0.
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != "Z" ]]
}

# Prints the pid of the slapd that this script started from DATA_DIR, if it is
# still running. The command line check protects against a reused pid.
running_pid() {
    local pid cmdline
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    process_alive "$pid" || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *slapd*"$CONFIG_DIR"* ]] || return 1
    printf '%s\n' "$pid"
}

# nettimeout covers only the TCP connect, so `timeout` bounds a server that
# accepts the connection and never responds.
accepts_bind() {
    timeout 3 ldapwhoami -x -H "$URL" -o nettimeout=2 >/dev/null 2>&1
}

# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------

# Writes cn=config as LDIF, with the schemas put in place of the @SCHEMAS@ line.
render_config() {
    local line schema
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" == "@SCHEMAS@" ]]; then
            for schema in "$SCHEMA_DIR/core.ldif" "$SCHEMA_DIR/cosine.ldif" \
                "$SCHEMA_DIR/nis.ldif" "$SCHEMA_DIR/inetorgperson.ldif" \
                "$AUTOPULL_SCHEMA"; do
                [[ -f "$schema" ]] || die "schema $schema was not found; set AUTOPULL_SLAPD_SCHEMAS to the folder of OpenLDAP's LDIF schemas"
                cat "$schema"
                printf '\n'
            done
            continue
        fi
        line="${line//@DB_DIR@/$DB_DIR}"
        line="${line//@MODULE_DIR@/$MODULE_DIR}"
        printf '%s\n' "$line"
    done <"$CONFIG_TEMPLATE"
}

# Creates cn=config and the database, then loads the directory, once per data
# directory. A failed attempt leaves no marker, so the next start begins again.
initialize() {
    if [[ -f "$LOADED_MARKER" ]]; then
        return 0
    fi
    if [[ -d "$DATA_DIR" && ! -f "$DATA_MARKER" ]] && [[ -n "$(ls -A "$DATA_DIR")" ]]; then
        die "$DATA_DIR is not empty and was not created by dev/slapd.sh; set AUTOPULL_SLAPD_DATA to a new or empty directory"
    fi
    [[ -f "$DIRECTORY_LDIF" ]] || die "AUTOPULL_SLAPD_LDIF=$DIRECTORY_LDIF was not found"

    rm -rf "$CONFIG_DIR" "$DB_DIR"
    mkdir -p "$CONFIG_DIR" "$DB_DIR"
    touch "$DATA_MARKER"
    render_config >"$DATA_DIR/config.ldif"

    if ! "$SLAPADD" -n 0 -F "$CONFIG_DIR" -l "$DATA_DIR/config.ldif" \
        >"$DATA_DIR/slapadd.log" 2>&1; then
        cat "$DATA_DIR/slapadd.log" >&2
        die "slapadd could not load the configuration $DATA_DIR/config.ldif"
    fi
    if ! "$SLAPADD" -F "$CONFIG_DIR" -b "$SUFFIX" -l "$DIRECTORY_LDIF" \
        >>"$DATA_DIR/slapadd.log" 2>&1; then
        cat "$DATA_DIR/slapadd.log" >&2
        die "slapadd could not load the entries of $DIRECTORY_LDIF"
    fi
    touch "$LOADED_MARKER"
}

# Returns 0 once slapd accepts a bind, 1 on timeout, and 2 if the process exits.
wait_until_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        if ! process_alive "$pid"; then
            return 2
        fi
        if accepts_bind; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

cmd_start() {
    require_installed
    local pid
    if pid="$(running_pid)"; then
        log "slapd is already running at $URL (pid $pid)"
        printf '%s\n' "$URL"
        return 0
    fi

    initialize
    if [[ -f "$LOG_FILE" ]]; then
        mv -f "$LOG_FILE" "$LOG_FILE.1"
    fi

    # With -d slapd stays in the foreground, so $! is its pid. Level none prints
    # only the messages slapd logs at every level, such as a failed bind of the
    # port. setsid keeps a Ctrl-C meant for the caller away from it.
    local -a detach=()
    if command -v setsid >/dev/null 2>&1; then
        detach=(setsid)
    fi
    "${detach[@]}" "$SLAPD" -d none -h "$URL" -F "$CONFIG_DIR" \
        >>"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"

    local status=0
    wait_until_ready "$pid" || status=$?
    if ((status != 0)); then
        cat "$LOG_FILE" >&2
        if ((status == 2)); then
            rm -f "$PID_FILE"
            die "slapd exited during start; its output is above and in $LOG_FILE"
        fi
        kill "$pid" 2>/dev/null || true
        rm -f "$PID_FILE"
        die "slapd did not accept a bind at $URL within ${START_TIMEOUT_S}s; its output is above and in $LOG_FILE"
    fi
    log "slapd is running at $URL (pid $pid, data $DATA_DIR)"
    printf '%s\n' "$URL"
}

# ---------------------------------------------------------------------------
# stop, status, reset
# ---------------------------------------------------------------------------

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while process_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if process_alive "$pid"; then
        log "slapd (pid $pid) did not exit within ${STOP_TIMEOUT_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    log "stopped slapd at $URL (pid $pid)"
}

cmd_status() {
    local pid
    if pid="$(running_pid)" && accepts_bind; then
        printf '%s\n' "$URL"
        return 0
    fi
    return 1
}

cmd_reset() {
    cmd_stop
    if [[ -d "$DATA_DIR" ]]; then
        [[ -f "$DATA_MARKER" ]] || die "$DATA_DIR was not created by dev/slapd.sh, so it is left in place"
        rm -rf "$DATA_DIR"
        log "deleted $DATA_DIR"
    fi
}

main() {
    local command="${1:-help}"
    case "$command" in
    install) cmd_install ;;
    start) validate_settings && cmd_start ;;
    stop) validate_settings && cmd_stop ;;
    status) validate_settings && cmd_status ;;
    reset) validate_settings && cmd_reset ;;
    help | -h | --help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
