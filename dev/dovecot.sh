#!/usr/bin/env bash
# Dovecot for development and tests: installs Debian's dovecot-imapd and runs
# private instances of it, each with its own configuration, base_dir, maildir
# storage and log under one directory, listening on 127.0.0.1 only. The system
# dovecot service is never started, stopped or configured.
#
# Usage: dev/dovecot.sh install|start|stop|status|help
# Run `dev/dovecot.sh help` for the environment variables it reads.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$ROOT/dev/dovecot/dovecot.conf.in"

# The mail user that owns every maildir. Dovecot refuses mail access for uids
# below first_valid_uid, and the configuration sets that to this uid.
VMAIL_USER=vmail
VMAIL_ID=5000

DIR="${AUTOPULL_DOVECOT_DIR:-$ROOT/.cache/dovecot/run}"
if [[ "$DIR" != /* ]]; then
    DIR="$PWD/$DIR"
fi
PORT="${AUTOPULL_DOVECOT_PORT:-10143}"
# full: Dovecot's own CAPABILITY. plain: neither MOVE nor UIDPLUS, as on HCL
# Domino 12. move: MOVE without UIDPLUS.
PROFILE="${AUTOPULL_DOVECOT_PROFILE:-full}"
MASTER_USER="${AUTOPULL_DOVECOT_MASTER_USER:-admin}"
MASTER_PASSWORD="${AUTOPULL_DOVECOT_MASTER_PASSWORD:-adminpw}"
START_TIMEOUT_S="${AUTOPULL_DOVECOT_START_TIMEOUT:-30}"
# With a certificate and key (PEM files), the instance also offers STARTTLS on PORT
# and IMAPS on TLS_PORT.
TLS_CERT="${AUTOPULL_DOVECOT_TLS_CERT:-}"
TLS_KEY="${AUTOPULL_DOVECOT_TLS_KEY:-}"
TLS_PORT="${AUTOPULL_DOVECOT_TLS_PORT:-}"

CONFIG_FILE="$DIR/dovecot.conf"
TLS_CONFIG_FILE="$DIR/tls.conf"
PID_FILE="$DIR/dovecot.pid"
LOG_FILE="$DIR/dovecot.log"
USERS_DIR="$DIR/users"
MASTER_USERS_FILE="$DIR/master-users"

# Capabilities of Dovecot 2.3.19 after login, less the ones a profile removes.
BASE_CAPABILITY="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE QUOTA"

log() {
    printf 'dovecot.sh: %s\n' "$*" >&2
}

die() {
    printf 'dovecot.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<USAGE
Usage: dev/dovecot.sh COMMAND

Commands:
  install  install dovecot-imapd from Debian's packages and create the $VMAIL_USER
           user (uid $VMAIL_ID); needs root; does nothing when both are present
  start    write a configuration into AUTOPULL_DOVECOT_DIR, check it with
           doveconf, start Dovecot in the background and wait for its port
  stop     stop the instance whose pid file is in AUTOPULL_DOVECOT_DIR
  status   exit 0 when that instance is running
  help     print this text

Environment:
  AUTOPULL_DOVECOT_DIR              instance directory (default .cache/dovecot/run)
  AUTOPULL_DOVECOT_PORT             IMAP port on 127.0.0.1 (default 10143)
  AUTOPULL_DOVECOT_PROFILE          full, plain (no MOVE, no UIDPLUS) or move
                                    (MOVE without UIDPLUS); default full
  AUTOPULL_DOVECOT_MASTER_USER      master user name (default admin)
  AUTOPULL_DOVECOT_MASTER_PASSWORD  master user password (default adminpw)
  AUTOPULL_DOVECOT_START_TIMEOUT    seconds to wait for the port (default 30)
  AUTOPULL_DOVECOT_TLS_CERT         PEM certificate; with a key, enables STARTTLS
  AUTOPULL_DOVECOT_TLS_KEY          PEM private key of that certificate
  AUTOPULL_DOVECOT_TLS_PORT         IMAPS port on 127.0.0.1 (default PORT + 1)

Each user is a file DIR/users/<user> with the line
"<user>:{PLAIN}<password>::::::<extra fields>", for example
"alice@example.com:{PLAIN}alicepw::::::" or, with a quota of one message,
"full@example.com:{PLAIN}pw::::::userdb_quota_rule=*:messages=1". Users can be
added while Dovecot runs. A changed file is read again at the first login after
the second in which it was last read. The master user logs in as any user with
the name "alice@example.com*admin".
USAGE
}

is_installed() {
    dpkg-query -W -f='${Status}' dovecot-imapd 2>/dev/null | grep -q 'install ok installed'
}

cmd_install() {
    [[ "$(id -u)" == 0 ]] || die "install needs root; run it as root or with sudo."
    if ! is_installed; then
        # The package's maintainer scripts would start the system service. A
        # policy-rc.d that exits 101 forbids that; an existing one is left alone.
        local policy=/usr/sbin/policy-rc.d
        local created_policy=no
        if [[ ! -e "$policy" ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            created_policy=yes
        fi
        log "installing dovecot-imapd from Debian's packages"
        local status=0
        {
            # Another apt-get on the machine holds the package lock for a while;
            # wait for it instead of failing at once.
            apt-get -o DPkg::Lock::Timeout=600 update -q &&
                DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
                    install -y -q --no-install-recommends dovecot-imapd
        } || status=$?
        if [[ "$created_policy" == yes ]]; then
            rm -f "$policy"
        fi
        [[ "$status" == 0 ]] || die "apt-get failed with exit code $status."
    fi

    if ! getent group "$VMAIL_USER" >/dev/null; then
        groupadd -g "$VMAIL_ID" "$VMAIL_USER"
    fi
    if ! getent passwd "$VMAIL_USER" >/dev/null; then
        useradd -u "$VMAIL_ID" -g "$VMAIL_USER" -d /nonexistent -M \
            -s /usr/sbin/nologin "$VMAIL_USER"
    fi
    local uid
    uid="$(id -u "$VMAIL_USER")"
    [[ "$uid" == "$VMAIL_ID" ]] ||
        die "user $VMAIL_USER exists with uid $uid, not $VMAIL_ID; remove it or change its uid."
    log "dovecot $(dovecot --version) is installed, mail user $VMAIL_USER has uid $VMAIL_ID"
}

capability_line() {
    local capability="$BASE_CAPABILITY"
    case "$PROFILE" in
    full) capability="$capability UIDPLUS MOVE" ;;
    plain) ;;
    move) capability="$capability MOVE" ;;
    *) die "AUTOPULL_DOVECOT_PROFILE is '$PROFILE'; use full, plain or move." ;;
    esac
    printf '%s' "$capability"
}

is_running() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

write_config() {
    mkdir -p "$DIR/base" "$DIR/mail"
    # The mail processes run as the vmail user and must reach DIR/mail.
    chmod 755 "$DIR"
    chown "$VMAIL_USER:$VMAIL_USER" "$DIR/mail"
    mkdir -p "$USERS_DIR"
    printf '%s:{PLAIN}%s\n' "$MASTER_USER" "$MASTER_PASSWORD" >"$MASTER_USERS_FILE"
    # The auth process runs as the dovecot user and reads the password files.
    chown root:dovecot "$USERS_DIR" "$MASTER_USERS_FILE"
    chmod 750 "$USERS_DIR"
    chmod 640 "$MASTER_USERS_FILE"

    local capability
    capability="$(capability_line)"
    sed -e "s|@DIR@|$DIR|g" \
        -e "s|@PORT@|$PORT|g" \
        -e "s|@VMAIL_USER@|$VMAIL_USER|g" \
        -e "s|@VMAIL_ID@|$VMAIL_ID|g" \
        -e "s|@CAPABILITY@|$capability|g" \
        "$TEMPLATE" >"$CONFIG_FILE"
    write_tls_config
}

# The main configuration includes this file, which is empty without TLS.
write_tls_config() {
    : >"$TLS_CONFIG_FILE"
    if [[ -z "$TLS_CERT" && -z "$TLS_KEY" ]]; then
        return 0
    fi
    [[ -r "$TLS_CERT" && -r "$TLS_KEY" ]] ||
        die "set both AUTOPULL_DOVECOT_TLS_CERT and AUTOPULL_DOVECOT_TLS_KEY to readable PEM files."
    [[ "$TLS_PORT" =~ ^[0-9]+$ ]] ||
        die "AUTOPULL_DOVECOT_TLS_PORT is '$TLS_PORT'; use a port number."
    cat >"$TLS_CONFIG_FILE" <<TLS
ssl = yes
ssl_cert = <$TLS_CERT
ssl_key = <$TLS_KEY
service imap-login {
  inet_listener imaps {
    address = 127.0.0.1
    port = $TLS_PORT
  }
}
TLS
}

cmd_start() {
    command -v dovecot >/dev/null ||
        die "dovecot was not found; run 'dev/dovecot.sh install' as root first."
    [[ "$PORT" =~ ^[0-9]+$ ]] || die "AUTOPULL_DOVECOT_PORT is '$PORT'; use a port number."
    if [[ -z "$TLS_PORT" ]]; then
        TLS_PORT=$((PORT + 1))
    fi
    if is_running; then
        log "already running with pid $(cat "$PID_FILE") in $DIR"
        return 0
    fi
    if port_open; then
        die "port $PORT on 127.0.0.1 is in use; set AUTOPULL_DOVECOT_PORT to a free port."
    fi

    write_config
    local check
    if ! check="$(doveconf -n -c "$CONFIG_FILE" 2>&1 >/dev/null)" || [[ -n "$check" ]]; then
        die "doveconf rejected $CONFIG_FILE: $check"
    fi

    : >"$LOG_FILE"
    nohup dovecot -F -c "$CONFIG_FILE" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"

    local waited=0
    until port_open; do
        if ! is_running; then
            die "dovecot exited during start; the end of $LOG_FILE: $(tail -n 20 "$LOG_FILE")"
        fi
        if ((waited >= START_TIMEOUT_S * 10)); then
            die "dovecot did not open port $PORT within ${START_TIMEOUT_S}s; see $LOG_FILE."
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "started pid $(cat "$PID_FILE") on 127.0.0.1:$PORT profile=$PROFILE dir=$DIR"
}

cmd_stop() {
    if ! is_running; then
        rm -f "$PID_FILE"
        log "not running in $DIR"
        return 0
    fi
    local pid
    pid="$(cat "$PID_FILE")"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 100)); then
            die "dovecot pid $pid did not stop within 10s."
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
    log "stopped pid $pid"
}

case "${1:-help}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) is_running ;;
help | -h | --help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
