#!/usr/bin/env bash
# Local single-node Kafka broker for development and tests. The broker runs in
# KRaft combined mode (broker and controller in one JVM) and listens on
# 127.0.0.1 only. Its jars come from Maven Central through dev/kafka/pom.xml.
#
# Usage: dev/kafka.sh fetch|start|stop|status|reset|help
# Run `dev/kafka.sh help` for the environment variables it reads.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

KAFKA_VERSION="${AUTOPULL_KAFKA_VERSION:-4.4.0}"
PORT="${AUTOPULL_KAFKA_PORT:-9092}"
# Defaults to PORT + 1, set in validate_settings once PORT is known to be a number.
CONTROLLER_PORT="${AUTOPULL_KAFKA_CONTROLLER_PORT:-}"
DATA_DIR="${AUTOPULL_KAFKA_DATA:-$ROOT/.cache/kafka/run-$PORT}"
# An absolute path, so the broker command line and pid checks do not depend on
# the directory the script is called from.
if [[ "$DATA_DIR" != /* ]]; then
    DATA_DIR="$PWD/$DATA_DIR"
fi
PYTHON="${AUTOPULL_PYTHON:-$ROOT/.venv/bin/python}"
START_TIMEOUT_S="${AUTOPULL_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT_S="${AUTOPULL_KAFKA_STOP_TIMEOUT:-30}"
HEAP="${AUTOPULL_KAFKA_HEAP:-512m}"

# Kafka 4.x brokers require Java 17 or newer.
MIN_JAVA_MAJOR=17
# Largest record batch the broker accepts. An alert may carry 1 MiB of message
# content, and this leaves room for headers, envelope fields and batch framing.
MESSAGE_MAX_BYTES=$((4 * 1024 * 1024))

POM="$ROOT/dev/kafka/pom.xml"
LOG4J_CONFIG="$ROOT/dev/kafka/log4j2.properties"
VERSION_DIR="$ROOT/.cache/kafka/$KAFKA_VERSION"
LIBS_DIR="$VERSION_DIR/libs"
FETCH_MARKER="$VERSION_DIR/fetch.complete"

CONFIG_FILE="$DATA_DIR/server.properties"
PID_FILE="$DATA_DIR/kafka.pid"
LOG_FILE="$DATA_DIR/kafka.log"
FORMAT_LOG_FILE="$DATA_DIR/format.log"
PORTS_FILE="$DATA_DIR/ports"
CLUSTER_ID_FILE="$DATA_DIR/cluster.id"
LOCK_FILE="$DATA_DIR/.lock"
# Present in every data directory this script created. `reset` deletes only
# directories that contain it, so a mistyped AUTOPULL_KAFKA_DATA cannot wipe
# unrelated files.
DATA_MARKER="$DATA_DIR/.autopull-kafka-data"

BOOTSTRAP="127.0.0.1:$PORT"

log() {
    printf 'kafka.sh: %s\n' "$*" >&2
}

die() {
    printf 'kafka.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: dev/kafka.sh COMMAND

Commands:
  fetch   Download the Kafka jars with Maven into .cache/kafka/<version>/libs.
  start   Format storage if needed and start the broker in the background.
          Exits 0 at once when this script's broker already runs on the port.
  stop    Stop the broker (SIGTERM, then SIGKILL after the stop timeout).
  status  Print the bootstrap address and exit 0 if the broker is running
          and responds to metadata requests, else exit 1.
  reset   Stop the broker and delete its data directory.

Environment:
  AUTOPULL_KAFKA_VERSION          Kafka version to fetch and run (default 4.4.0)
  AUTOPULL_KAFKA_PORT             client listener port on 127.0.0.1 (default 9092)
  AUTOPULL_KAFKA_CONTROLLER_PORT  KRaft controller port (default: client port + 1)
  AUTOPULL_KAFKA_DATA             data directory (default .cache/kafka/run-<port>)
  AUTOPULL_PYTHON                 Python with confluent_kafka, used for the
                                  metadata health check (default .venv/bin/python)
  AUTOPULL_KAFKA_START_TIMEOUT    seconds to wait for the broker to serve (default 90)
  AUTOPULL_KAFKA_STOP_TIMEOUT     seconds to wait for a clean exit (default 30)
  AUTOPULL_KAFKA_HEAP             maximum JVM heap, as for -Xmx (default 512m)
EOF
}

# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

validate_port() {
    local name="$1" value="$2"
    if ! [[ "$value" =~ ^[1-9][0-9]*$ ]] || ((value > 65535)); then
        die "$name=$value is not a valid TCP port (expected 1-65535)"
    fi
}

validate_settings() {
    validate_port AUTOPULL_KAFKA_PORT "$PORT"
    if [[ -z "$CONTROLLER_PORT" ]]; then
        CONTROLLER_PORT=$((PORT + 1))
    fi
    validate_port AUTOPULL_KAFKA_CONTROLLER_PORT "$CONTROLLER_PORT"
    if [[ "$PORT" == "$CONTROLLER_PORT" ]]; then
        die "AUTOPULL_KAFKA_PORT and AUTOPULL_KAFKA_CONTROLLER_PORT are both $PORT; they must differ"
    fi
    if ! [[ "$START_TIMEOUT_S" =~ ^[0-9]+$ && "$STOP_TIMEOUT_S" =~ ^[0-9]+$ ]]; then
        die "AUTOPULL_KAFKA_START_TIMEOUT and AUTOPULL_KAFKA_STOP_TIMEOUT must be whole seconds"
    fi
}

require_java() {
    if ! command -v java >/dev/null 2>&1; then
        die "java not found on PATH. Kafka $KAFKA_VERSION needs Java $MIN_JAVA_MAJOR or newer: install a JDK or JRE $MIN_JAVA_MAJOR+ (Debian: apt-get install openjdk-17-jre-headless)."
    fi

    # The first line of `java -version` looks like: openjdk version "17.0.15" 2025-04-15
    # (Java 8 and older report "1.8.0_392").
    local version major
    version="$(java -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)"
    major="${version%%.*}"
    if [[ "$major" == "1" ]]; then
        major="$(cut -d. -f2 <<<"$version")"
    fi
    major="${major%%[^0-9]*}"
    if [[ -z "$major" ]]; then
        die "could not read the Java version from 'java -version'. Kafka $KAFKA_VERSION needs Java $MIN_JAVA_MAJOR or newer."
    fi
    if ((major < MIN_JAVA_MAJOR)); then
        die "java on PATH is version $version, but Kafka $KAFKA_VERSION needs Java $MIN_JAVA_MAJOR or newer: install a JDK or JRE $MIN_JAVA_MAJOR+ (Debian: apt-get install openjdk-17-jre-headless) and put it first on PATH."
    fi
}

require_maven() {
    if ! command -v mvn >/dev/null 2>&1; then
        die "mvn not found on PATH. Maven downloads the Kafka jars on the first start: install Apache Maven 3.6 or newer (Debian: apt-get install maven)."
    fi
}

# Takes an exclusive lock on a file for the rest of the script, so that two
# invocations (for example two pytest processes) do not start or stop the same
# broker at once. Without flock the script runs unlocked.
lock_file() {
    local file="$1" fd="$2" timeout_s="$3"
    if ! command -v flock >/dev/null 2>&1; then
        return 0
    fi
    eval "exec $fd>\"\$file\""
    if ! flock -w "$timeout_s" "$fd"; then
        die "timed out after ${timeout_s}s waiting for the lock $file held by another dev/kafka.sh"
    fi
}

# ---------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------

cmd_fetch() {
    if ! [[ "$KAFKA_VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.-][A-Za-z0-9.-]+)?$ ]]; then
        die "AUTOPULL_KAFKA_VERSION=$KAFKA_VERSION is not a Kafka version such as 4.4.0"
    fi
    mkdir -p "$VERSION_DIR"
    lock_file "$VERSION_DIR/.lock" 8 600

    # The marker stores a hash of the pom, so a changed dependency list fetches again.
    local pom_hash
    pom_hash="$(sha256sum "$POM" | cut -d' ' -f1)"
    if [[ -f "$FETCH_MARKER" && "$(cat "$FETCH_MARKER")" == "$pom_hash" ]]; then
        return 0
    fi

    require_java
    require_maven

    local staging="$LIBS_DIR.partial"
    rm -rf "$staging"
    mkdir -p "$staging"
    log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies with Maven"
    local started=$SECONDS
    local maven_log="$VERSION_DIR/fetch.log"
    if ! mvn -B -q -f "$POM" dependency:copy-dependencies \
        -Dkafka.version="$KAFKA_VERSION" \
        -DincludeScope=runtime \
        -DoutputDirectory="$staging" >"$maven_log" 2>&1; then
        tail -n 30 "$maven_log" >&2
        rm -rf "$staging"
        die "Maven failed to resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (full output in $maven_log). Check AUTOPULL_KAFKA_VERSION and that Maven Central is reachable."
    fi

    # Zip archives store entry names uncompressed, so grep finds the class
    # without unzip being installed.
    local broker_jar="$staging/kafka_2.13-$KAFKA_VERSION.jar"
    if [[ ! -f "$broker_jar" ]]; then
        rm -rf "$staging"
        die "Maven finished, but $(basename "$broker_jar") is missing from the copied jars"
    fi
    if ! grep -qaF 'kafka/tools/StorageTool.class' "$broker_jar"; then
        rm -rf "$staging"
        die "$(basename "$broker_jar") does not contain kafka/tools/StorageTool.class, which start needs to format storage"
    fi

    rm -rf "$LIBS_DIR"
    mv "$staging" "$LIBS_DIR"
    printf '%s\n' "$pom_hash" >"$FETCH_MARKER"
    log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars into $LIBS_DIR in $((SECONDS - started))s"
}

# ---------------------------------------------------------------------------
# Process and health checks
# ---------------------------------------------------------------------------

process_alive() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    # An exited process whose parent has not reaped it yet (a zombie) still passes kill -0.
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != "Z" ]]
}

# Prints the pid of the broker that this script started from DATA_DIR, if it
# is still running. The command line check protects against a reused pid.
running_broker_pid() {
    local pid cmdline
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    process_alive "$pid" || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *kafka.Kafka*"$CONFIG_FILE"* ]] || return 1
    printf '%s\n' "$pid"
}

tcp_port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

python_has_confluent_kafka() {
    if [[ -z "${PYTHON_CHECKED:-}" ]]; then
        PYTHON_CHECKED=1
        PYTHON_USABLE=0
        if [[ -x "$PYTHON" ]] && "$PYTHON" -c 'import confluent_kafka' >/dev/null 2>&1; then
            PYTHON_USABLE=1
        fi
    fi
    [[ "$PYTHON_USABLE" == 1 ]]
}

# Succeeds when the broker on BOOTSTRAP returns metadata that lists at least
# one broker. Without a Python that has confluent_kafka, it falls back
# to a TCP connect plus the start-up line in the broker log.
broker_healthy() {
    if python_has_confluent_kafka; then
        "$PYTHON" - "$BOOTSTRAP" >/dev/null 2>&1 <<'PY'
import sys

from confluent_kafka.admin import AdminClient

admin = AdminClient({"bootstrap.servers": sys.argv[1], "socket.connection.setup.timeout.ms": 2000})
metadata = admin.list_topics(timeout=3)
sys.exit(0 if metadata.brokers else 1)
PY
    else
        tcp_port_open "$PORT" && grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null
    fi
}

# Returns 0 once the broker is healthy, 1 on timeout, and 2 if the process exits.
wait_until_healthy() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        if ! process_alive "$pid"; then
            return 2
        fi
        if broker_healthy; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# ---------------------------------------------------------------------------
# start
# ---------------------------------------------------------------------------

prepare_data_dir() {
    if [[ -d "$DATA_DIR" && ! -f "$DATA_MARKER" ]] && [[ -n "$(ls -A "$DATA_DIR")" ]]; then
        die "$DATA_DIR is not empty and was not created by dev/kafka.sh; set AUTOPULL_KAFKA_DATA to a new or empty directory"
    fi
    mkdir -p "$DATA_DIR"
    touch "$DATA_MARKER"
}

# Rejects a data directory formatted for other ports, because the KRaft metadata
# log stores the controller endpoint given at format time.
check_formatted_ports() {
    local formatted
    [[ -f "$PORTS_FILE" ]] || return 0
    formatted="$(cat "$PORTS_FILE")"
    if [[ "$formatted" != "$PORT $CONTROLLER_PORT" ]]; then
        die "$DATA_DIR was formatted for ports $formatted (client, controller), not $PORT $CONTROLLER_PORT; run 'dev/kafka.sh reset' with the old ports or choose another AUTOPULL_KAFKA_DATA"
    fi
}

write_server_properties() {
    cat >"$CONFIG_FILE" <<EOF
# Generated by dev/kafka.sh on each start; edits are overwritten.
# Single node in KRaft combined mode: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT

# Listen on the loopback interface only.
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$DATA_DIR/logs

# Applications create their topics explicitly, as they must in production.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1

# One broker, so every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Consumer groups start at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0

# 4 MiB, so records carrying a 1 MiB alert fit with room for framing. Producers
# must raise their own limit (about 1 MB by default) to send such records.
message.max.bytes=$MESSAGE_MAX_BYTES
replica.fetch.max.bytes=$MESSAGE_MAX_BYTES
EOF
}

format_storage() {
    if [[ -f "$DATA_DIR/logs/meta.properties" ]]; then
        return 0
    fi

    # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding.
    # About one id in 64 starts with "-", so it is passed as --cluster-id=ID: a
    # separate argument would be read as an option.
    local cluster_id
    if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
        head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$CLUSTER_ID_FILE"
    fi
    cluster_id="$(cat "$CLUSTER_ID_FILE")"

    log "formatting KRaft storage in $DATA_DIR/logs (cluster id $cluster_id)"
    if ! java -cp "$LIBS_DIR/*" \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
        kafka.tools.StorageTool format --standalone \
        --cluster-id="$cluster_id" -c "$CONFIG_FILE" --ignore-formatted \
        >"$FORMAT_LOG_FILE" 2>&1; then
        tail -n 20 "$FORMAT_LOG_FILE" >&2
        die "formatting storage failed; full output in $FORMAT_LOG_FILE"
    fi
    printf '%s %s\n' "$PORT" "$CONTROLLER_PORT" >"$PORTS_FILE"
}

launch_broker() {
    if [[ -f "$LOG_FILE" ]]; then
        mv -f "$LOG_FILE" "$LOG_FILE.1"
    fi
    rm -f "$PID_FILE"

    local -a java_cmd=(
        java
        "-Xmx$HEAP"
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20
        -XX:+ExitOnOutOfMemoryError
        -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$LOG4J_CONFIG"
        -Dkafka.logs.dir="$DATA_DIR"
        -cp "$LIBS_DIR/*"
        kafka.Kafka "$CONFIG_FILE"
    )
    # setsid puts the broker in its own session, so Ctrl-C in the terminal or
    # test run that started it does not stop it. The inner shell writes its
    # own pid, which exec hands on to java. File descriptors 8 and 9 hold this
    # script's locks and are closed, or the broker would keep the locks held.
    local -a detach=()
    if command -v setsid >/dev/null 2>&1; then
        detach=(setsid)
    fi
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner shell.
    "${detach[@]}" bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" "${java_cmd[@]}" \
        >>"$LOG_FILE" 2>&1 </dev/null 8>&- 9>&- &

    local waited=0
    while [[ ! -s "$PID_FILE" ]]; do
        if ((waited >= 50)); then
            die "the broker process did not write $PID_FILE within 5 s; see $LOG_FILE"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

cmd_start() {
    validate_settings
    prepare_data_dir
    lock_file "$LOCK_FILE" 9 $((START_TIMEOUT_S + STOP_TIMEOUT_S + 60))

    local pid status
    if pid="$(running_broker_pid)"; then
        status=0
        wait_until_healthy "$pid" || status=$?
        if ((status == 0)); then
            log "broker already running on $BOOTSTRAP (pid $pid, data in $DATA_DIR)"
            return 0
        fi
        die "broker process $pid from $DATA_DIR is running but did not respond to metadata requests on $BOOTSTRAP within ${START_TIMEOUT_S}s. See $LOG_FILE, or run 'dev/kafka.sh stop'."
    fi

    local port
    for port in "$PORT" "$CONTROLLER_PORT"; do
        if tcp_port_open "$port"; then
            die "port $port on 127.0.0.1 is already in use by a process that dev/kafka.sh did not start from $DATA_DIR. Stop that process, or choose other ports with AUTOPULL_KAFKA_PORT and AUTOPULL_KAFKA_CONTROLLER_PORT. A broker started with another AUTOPULL_KAFKA_DATA must be stopped with that same value."
        fi
    done

    require_java
    cmd_fetch
    check_formatted_ports

    local started=$SECONDS
    write_server_properties
    format_storage
    launch_broker
    pid="$(cat "$PID_FILE")"

    status=0
    wait_until_healthy "$pid" || status=$?
    case "$status" in
        0)
            log "Kafka $KAFKA_VERSION broker serving on $BOOTSTRAP after $((SECONDS - started))s (pid $pid, log $LOG_FILE)"
            ;;
        2)
            tail -n 30 "$LOG_FILE" >&2
            rm -f "$PID_FILE"
            die "the broker exited during start-up; full log in $LOG_FILE"
            ;;
        *)
            tail -n 30 "$LOG_FILE" >&2
            die "the broker (pid $pid) did not respond to metadata requests on $BOOTSTRAP within ${START_TIMEOUT_S}s. It is still running: see $LOG_FILE and run 'dev/kafka.sh stop'."
            ;;
    esac
}

# ---------------------------------------------------------------------------
# stop, status, reset
# ---------------------------------------------------------------------------

stop_broker() {
    local pid
    if ! pid="$(running_broker_pid)"; then
        rm -f "$PID_FILE"
        log "no broker running from $DATA_DIR"
        return 0
    fi

    log "stopping broker pid $pid on $BOOTSTRAP"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while process_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if process_alive "$pid"; then
        log "broker pid $pid did not exit within ${STOP_TIMEOUT_S}s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while process_alive "$pid"; do
            sleep 0.1
        done
    fi
    rm -f "$PID_FILE"
    log "broker stopped"
}

cmd_stop() {
    validate_settings
    if [[ ! -d "$DATA_DIR" ]]; then
        log "no broker running from $DATA_DIR"
        return 0
    fi
    lock_file "$LOCK_FILE" 9 $((START_TIMEOUT_S + STOP_TIMEOUT_S + 60))
    stop_broker
}

cmd_status() {
    validate_settings
    local pid
    if ! pid="$(running_broker_pid)"; then
        log "no broker running from $DATA_DIR"
        exit 1
    fi
    if ! broker_healthy; then
        log "broker pid $pid is running but does not respond to metadata requests on $BOOTSTRAP; see $LOG_FILE"
        exit 1
    fi
    log "broker pid $pid is running and healthy (data in $DATA_DIR)"
    printf '%s\n' "$BOOTSTRAP"
}

cmd_reset() {
    validate_settings
    if [[ ! -d "$DATA_DIR" ]]; then
        log "nothing to reset: $DATA_DIR does not exist"
        return 0
    fi
    if [[ ! -f "$DATA_MARKER" ]]; then
        die "$DATA_DIR was not created by dev/kafka.sh (no $(basename "$DATA_MARKER") file), so reset does not delete it"
    fi
    lock_file "$LOCK_FILE" 9 $((START_TIMEOUT_S + STOP_TIMEOUT_S + 60))
    stop_broker
    rm -rf "$DATA_DIR"
    log "deleted $DATA_DIR"
}

main() {
    local command="${1:-help}"
    case "$command" in
        fetch) cmd_fetch ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        reset) cmd_reset ;;
        help | -h | --help) usage ;;
        *)
            usage >&2
            die "unknown command '$command'"
            ;;
    esac
}

main "$@"
