#!/usr/bin/env bash
# Run a throwaway RabbitMQ (Debian's rabbitmq-server package) on loopback, as the reference
# broker for Warren's client tests and benchmarks.
#
#   scripts/rabbitmq.sh start <dir> <amqp-port>   start it, return once it accepts AMQP
#   scripts/rabbitmq.sh stop  <dir> <amqp-port>   stop exactly that instance
#
# Every piece of state (database, logs, config, Erlang cookie, epmd) lives under <dir> or on
# ports chosen here, so it never touches a system RabbitMQ or another instance: its own
# node name, its own epmd on a free port, its distribution listener on a free loopback port,
# no plugins (hence no management listener). Once started, the AMQP URL is
# amqp://guest:guest@127.0.0.1:<amqp-port>/%2f and it is also written to <dir>/amqp-url.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop <dir> <amqp-port>" >&2
    exit 2
}

[ $# -eq 3 ] || usage
action=$1
dir=$2
port=$3
case "$port" in '' | *[!0-9]*) usage ;; esac

START_TIMEOUT=${RABBITMQ_START_TIMEOUT:-90}
RABBITMQ_LIB=/usr/lib/rabbitmq/bin

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True once the broker answers an AMQP 0-9-1 protocol header with a connection.start frame.
accepts_amqp() {
    python3 - "$1" <<'EOF'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
    s.settimeout(2)
    s.sendall(b"AMQP\x00\x00\x09\x01")
    head = s.recv(7)
    # frame type 1 (method) on channel 0: connection.start
    sys.exit(0 if len(head) == 7 and head[0] == 1 and head[1:3] == b"\x00\x00" else 1)
except OSError:
    sys.exit(1)
EOF
}

# Send SIGTERM, then SIGKILL after a grace period, to a process group whose leader is $1.
kill_group() {
    local pgid=$1
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
}

stop() {
    local state="$dir/state"
    if [ -f "$state/server.pgid" ]; then
        kill_group "$(cat "$state/server.pgid")"
        rm -f "$state/server.pgid"
    fi
    if [ -f "$state/epmd.port" ]; then
        # Our epmd serves only this instance; ask it to exit, then make sure.
        local eport
        eport=$(cat "$state/epmd.port")
        ERL_EPMD_PORT=$eport epmd -kill >/dev/null 2>&1 || true
        if [ -f "$state/epmd.pgid" ]; then
            kill_group "$(cat "$state/epmd.pgid")"
            rm -f "$state/epmd.pgid"
        fi
        rm -f "$state/epmd.port"
    fi
}

start() {
    command -v "$RABBITMQ_LIB/rabbitmq-server" >/dev/null ||
        { echo "rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
    if accepts_amqp "$port"; then
        echo "port $port already accepts AMQP: refusing to start a second broker there" >&2
        exit 1
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local state="$dir/state"
    mkdir -p "$state" "$dir/mnesia" "$dir/log" "$dir/home"
    stop # leftovers of an earlier run in the same directory

    # A private cookie: the Erlang VM reads $HOME/.erlang.cookie.
    if [ ! -f "$dir/home/.erlang.cookie" ]; then
        python3 -c 'import secrets; print(secrets.token_hex(20).upper(), end="")' >"$dir/home/.erlang.cookie"
        chmod 400 "$dir/home/.erlang.cookie"
    fi
    echo '[].' >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$port
log.console = false
log.file.level = info
EOF
    echo '[].' >"$dir/advanced.config"

    local epmd_port dist_port nodename
    epmd_port=$(free_port)
    dist_port=$(free_port)
    nodename="warren-ref-$port@localhost" # stable, so a restart on <dir> finds its data

    echo "$epmd_port" >"$state/epmd.port"
    setsid env ERL_EPMD_PORT="$epmd_port" ERL_EPMD_ADDRESS=127.0.0.1 epmd \
        </dev/null >"$dir/log/epmd.log" 2>&1 &
    echo $! >"$state/epmd.pgid"
    # Wait for it, or the VM would start (and daemonize) an epmd of its own that stop misses.
    local tries=0
    until ERL_EPMD_PORT=$epmd_port epmd -names >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ $tries -gt 100 ]; then
            echo "epmd did not start on port $epmd_port" >&2
            stop
            exit 1
        fi
        sleep 0.1
    done

    setsid env -i \
        PATH="/usr/sbin:/usr/bin:/sbin:/bin" \
        HOME="$dir/home" \
        LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        ERL_EPMD_PORT="$epmd_port" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$state/rabbitmq.pid" \
        RABBITMQ_NODENAME="$nodename" \
        RABBITMQ_USE_LONGNAME=false \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" \
        RABBITMQ_DIST_PORT="$dist_port" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$RABBITMQ_LIB/rabbitmq-server" </dev/null >"$dir/log/stdout.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$state/server.pgid"

    local deadline=$((SECONDS + START_TIMEOUT))
    until accepts_amqp "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "RabbitMQ exited during start-up; last log lines:" >&2
            tail -n 30 "$dir/log/stdout.log" >&2 || true
            stop
            exit 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "RabbitMQ did not accept AMQP on port $port within ${START_TIMEOUT}s" >&2
            tail -n 30 "$dir/log/stdout.log" >&2 || true
            stop
            exit 1
        fi
        sleep 0.5
    done
    echo "amqp://guest:guest@127.0.0.1:$port/%2f" | tee "$dir/amqp-url"
}

case "$action" in
    start) start ;;
    stop)
        if [ -d "$dir" ]; then
            dir=$(cd "$dir" && pwd)
            stop
        fi
        ;;
    *) usage ;;
esac
