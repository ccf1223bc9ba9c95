#!/usr/bin/env bash
# A local Redis Cluster of three primaries on 127.0.0.1 ports 7101-7103, for the benches and
# by hand (the tests start their own):
#   bash scripts/redis_cluster.sh start   # prints REDIS_CLUSTER_NODES=…
#   bash scripts/redis_cluster.sh stop
set -euo pipefail
PORTS=(7101 7102 7103)
DIR="${TMPDIR:-/tmp}/tower-idempotency-cluster"
case "${1:-}" in
start)
    mkdir -p "$DIR"
    for p in "${PORTS[@]}"; do
        mkdir -p "$DIR/$p"
        redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file nodes.conf --dir "$DIR/$p" --save "" --appendonly no \
            --daemonize yes --pidfile "$DIR/$p/redis.pid" >/dev/null
    done
    for p in "${PORTS[@]}"; do
        for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
    for p in "${PORTS[@]}"; do
        for _ in $(seq 1 100); do
            redis-cli -p "$p" cluster info | grep -q cluster_state:ok && break
            sleep 0.1
        done
    done
    echo "REDIS_CLUSTER_NODES=$(printf '127.0.0.1:%s,' "${PORTS[@]}" | sed 's/,$//')"
    ;;
stop)
    for p in "${PORTS[@]}"; do
        redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
    done
    rm -rf "$DIR"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
