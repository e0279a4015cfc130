#!/usr/bin/env bash
# Install what Warren's test suite needs on a Debian machine; quick when all is in place.
#
#   scripts/install-test-deps.sh              client libraries for every test runner
#   scripts/install-test-deps.sh --rabbitmq   also rabbitmq-server (reference broker for
#                                             `scripts/test.sh --against-rabbitmq` and benchmarks)
#
# Debian packages: a JDK and the RabbitMQ Java client (librabbitmq-client-java, which brings
# slf4j), and nftables (the partition fault scenario). Python: a virtualenv at .venv with
# tests/python/requirements.txt. Node: amqplib in tests/node/node_modules from package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."

with_rabbitmq=false
for arg in "$@"; do
    case "$arg" in
        --rabbitmq) with_rabbitmq=true ;;
        *) echo "usage: $0 [--rabbitmq]" >&2; exit 2 ;;
    esac
done

log() { echo "install-test-deps: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ---- Debian packages --------------------------------------------------------------------
packages=()
command -v javac >/dev/null 2>&1 || packages+=(default-jdk-headless)
[ -f /usr/share/java/amqp-client.jar ] || packages+=(librabbitmq-client-java)
[ -f /usr/share/java/slf4j-nop.jar ] || packages+=(libslf4j-java)
command -v setsid >/dev/null 2>&1 || packages+=(util-linux)
# The partition fault scenario (tests/tests/faults.rs) cuts a zone off with nftables rules.
command -v nft >/dev/null 2>&1 || packages+=(nftables)
if $with_rabbitmq && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    packages+=(rabbitmq-server)
fi

if [ ${#packages[@]} -gt 0 ]; then
    log "apt-get install ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Never let a package start a system service: the tests start their own brokers.
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        own_policy=true
    fi
    cleanup_policy() { if $own_policy; then as_root rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    as_root apt-get update -qq >/dev/null
    install() {
        as_root apt-get install -y -qq --no-install-recommends "${packages[@]}" >/tmp/warren-apt.log 2>&1
    }
    if ! install; then
        log "apt-get install failed once; retrying"
        if ! install; then
            tail -n 30 /tmp/warren-apt.log >&2
            exit 1
        fi
    fi
    cleanup_policy
    trap - EXIT
fi

# ---- Python ------------------------------------------------------------------------------
requirements=tests/python/requirements.txt
stamp=.venv/.warren-requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "python venv (.venv) from $requirements"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r "$requirements"
    echo "$want" >"$stamp"
fi

# ---- Node --------------------------------------------------------------------------------
if [ ! -f tests/node/node_modules/.package-lock.json ] ||
    [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then
    log "npm ci in tests/node"
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
