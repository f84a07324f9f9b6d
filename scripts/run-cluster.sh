#!/usr/bin/env bash
# `make run-cluster`: a 3-member etcd cluster on loopback and three Ward replicas in dev mode
# on it, sharing one SoftHSM token and one dev CA, everything under $WARD_CLUSTER_DIR
# (.ward-cluster) and kept between runs. Prints how to call each replica, then waits; Ctrl-C
# stops the replicas (SIGTERM) and then etcd.
#
#   scripts/run-cluster.sh WARD_SERVER_BIN WARDCTL_BIN
#
# Layout: etcd/m{1,2,3}/ (members' data, logs in etcd/m*.log), replica-{1,2,3}/ (each a dev
# data dir: ward.toml with the [store] tables, its own data/ and audit log, tls/ and hsm.pin
# copied from replica-1, softhsm/softhsm2.conf naming replica-1's token directory), and
# replica-*.log. Ports: etcd clients 2379/22379/32379, peers 2380/22380/32380, replicas
# $WARD_CLUSTER_PORTS (8443 8444 8445); metrics and portal on free ports (see the logs).
set -euo pipefail

server=${1:?usage: run-cluster.sh WARD_SERVER_BIN WARDCTL_BIN}
wardctl=${2:?usage: run-cluster.sh WARD_SERVER_BIN WARDCTL_BIN}
server=$(realpath "$server")
wardctl=$(realpath "$wardctl")
dir=${WARD_CLUSTER_DIR:-.ward-cluster}
read -r -a ports <<<"${WARD_CLUSTER_PORTS:-8443 8444 8445}"
etcd_client=(2379 22379 32379)
etcd_peer=(2380 22380 32380)
[ "${#ports[@]}" = 3 ] || { echo "WARD_CLUSTER_PORTS needs three ports" >&2; exit 2; }
command -v etcd >/dev/null || { echo "etcd not found: make deps installs etcd-server" >&2; exit 1; }

mkdir -p "$dir/etcd"
chmod 700 "$dir"
dir=$(cd "$dir" && pwd)

stop() {
  trap - INT TERM EXIT
  echo
  echo "run-cluster: stopping"
  # Replicas first (they hand back unspent quota and leave the registry), then etcd.
  for f in "$dir"/replica-*.pid "$dir"/etcd/m*.pid; do
    [ -e "$f" ] || continue
    kill -TERM "$(cat "$f")" 2>/dev/null || true
    while kill -0 "$(cat "$f")" 2>/dev/null; do sleep 0.1; done
    rm -f "$f"
  done
}
trap stop INT TERM HUP EXIT

# Waits up to 60 s for process $1 to print its ready line to the file $2; fails with the
# file's tail if it does not, or exits first.
wait_ready() {
  local pid=$1 file=$2
  for _ in $(seq 600); do
    if grep -q "ward-server ready" "$file" 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "run-cluster: $file: no ready line (process $pid exited or took over 60 s):" >&2
  tail -n 30 "$file" >&2
  return 1
}

# --- etcd -----------------------------------------------------------------------------------
cluster=""
for i in 0 1 2; do
  cluster+="${cluster:+,}m$((i + 1))=http://127.0.0.1:${etcd_peer[$i]}"
done
endpoints=()
for i in 0 1 2; do
  name="m$((i + 1))"
  client="http://127.0.0.1:${etcd_client[$i]}"
  peer="http://127.0.0.1:${etcd_peer[$i]}"
  endpoints+=("$client")
  # On a data dir that exists, etcd ignores the --initial-* flags and rejoins. Every child
  # runs in its own session, so that Ctrl-C reaches this script alone and `stop` ends them in
  # order.
  setsid etcd --name "$name" --data-dir "$dir/etcd/$name" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$cluster" --initial-cluster-token ward-run-cluster \
    --initial-cluster-state new --auto-compaction-retention 1h \
    --logger zap --log-outputs stderr >>"$dir/etcd/$name.log" 2>&1 &
  echo $! >"$dir/etcd/$name.pid"
done
for i in 0 1 2; do
  ok=""
  for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:${etcd_client[$i]}/health" 2>/dev/null | grep -q '"health":"true"'; then
      ok=1
      break
    fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "run-cluster: etcd m$((i + 1)) not healthy; see $dir/etcd/m$((i + 1)).log" >&2; exit 1; }
done
echo "run-cluster: etcd healthy at ${endpoints[*]}"

# --- the replicas' directories (first run only) ---------------------------------------------
first="$dir/replica-1"
if [ ! -e "$first/ward.toml" ]; then
  # Dev mode creates the token, master key, CA, certificates, policy and ward.toml; it serves
  # on sled, so it is stopped at once and its sled data removed.
  echo "run-cluster: creating the shared token and CA in $first"
  setsid "$server" dev --data-dir "$first" --listen "127.0.0.1:${ports[0]}" >"$dir/replica-1.log" 2>&1 &
  echo $! >"$dir/replica-1.pid"
  wait_ready "$(cat "$dir/replica-1.pid")" "$dir/replica-1.log"
  kill -TERM "$(cat "$dir/replica-1.pid")"
  wait "$(cat "$dir/replica-1.pid")" || true
  rm "$dir/replica-1.pid"
  rm -rf "$first/data"
  list=$(printf '"%s", ' "${endpoints[@]}")
  cat >>"$first/ward.toml" <<EOF

[store]
backend = "etcd"

[store.etcd]
endpoints = [${list%, }]
prefix = "/ward/"
EOF
fi
for n in 2 3; do
  d="$dir/replica-$n"
  [ -e "$d/ward.toml" ] && continue
  # Everything but the token (softhsm2.conf names replica-1's token directory by its absolute
  # path) and the data: one token, one CA, one policy, each replica its own audit log.
  mkdir -m 700 -p "$d/softhsm"
  cp -p "$first/ward.toml" "$first/policy.toml" "$first/hsm.pin" "$d/"
  cp -pr "$first/tls" "$d/"
  cp -p "$first/softhsm/softhsm2.conf" "$d/softhsm/"
done

# --- the replicas ---------------------------------------------------------------------------
addrs=()
for n in 1 2 3; do
  port=${ports[$((n - 1))]}
  : >"$dir/replica-$n.log"
  setsid "$server" dev --data-dir "$dir/replica-$n" --listen "127.0.0.1:$port" >>"$dir/replica-$n.log" 2>&1 &
  echo $! >"$dir/replica-$n.pid"
  # One at a time: each is ready before the next starts.
  wait_ready "$(cat "$dir/replica-$n.pid")" "$dir/replica-$n.log"
  addrs+=("https://127.0.0.1:$port")
done
all=$(IFS=,; echo "${addrs[*]}")

d="$dir/replica-1"
cat <<EOF

Ward cluster: 3 replicas on a 3-member etcd, one SoftHSM token and one dev CA, in $dir
  etcd:     ${endpoints[*]}    (logs: $dir/etcd/m*.log)
  replicas: ${addrs[*]}    (logs: $dir/replica-*.log, pids: $dir/replica-*.pid)

  grpcurl, one replica each (the same certificates are good for all three):
EOF
for n in 1 2 3; do
  a=${addrs[$((n - 1))]#https://}
  echo "    grpcurl -cacert $d/tls/ca.pem -cert $d/tls/app.pem -key $d/tls/app.key \\"
  echo "      -d '{\"name\":\"demo/db-password\"}' $a ward.v1.Secrets/FetchSecret"
done
cat <<EOF

  wardctl, over the whole cluster (fails over between replicas):
    export WARD_ADDR=$all \\
           WARD_CA=$d/tls/ca.pem WARD_CERT=$d/tls/admin.pem WARD_KEY=$d/tls/admin.key
    printf 's3cret' | $wardctl put demo/db-password
    $wardctl get demo/db-password
  or one replica: WARD_ADDR=${addrs[1]} $wardctl get demo/db-password

  Try a failure: kill -9 \$(cat $dir/replica-2.pid), or an etcd member:
  kill -9 \$(cat $dir/etcd/m1.pid). Ctrl-C stops everything; rm -rf $dir starts afresh.
EOF

wait
