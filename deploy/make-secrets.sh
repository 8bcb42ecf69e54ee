#!/usr/bin/env bash
# Makes tabby's two Secrets from a directory made by `tabby-controller certs`,
# and prints them (default) or applies them (--apply):
#
#   tabby-controller-tls  tls.crt (server.pem), tls.key (server-key.pem), ca.crt (ca.pem)
#   tabby-nodes-tls       ca.crt (ca.pem), and for every node-<name>.pem with its
#                         node-<name>-key.pem: <name>.crt and <name>.key
#
# Usage: deploy/make-secrets.sh [--apply] CERTS_DIR
#
# The CA's key (ca-key.pem) and admin certificates are never put in a Secret.
# Printed Secrets contain private keys: do not commit them. --apply uses
# server-side apply, so the Secret is not copied into a
# last-applied-configuration annotation (whose 256 KiB limit would stop at a
# few hundred nodes); run it again after adding a node's certificate, and
# running pods get the new files without a restart.
set -euo pipefail

NAMESPACE=tabby-system
# The names the manifests mount (validate.sh checks them against each other).
CONTROLLER_SECRET=tabby-controller-tls
NODES_SECRET=tabby-nodes-tls
usage() { echo "usage: $0 [--apply] CERTS_DIR" >&2; exit 2; }

apply=false
dir=""
for a in "$@"; do
  case "$a" in
    --apply) apply=true ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$dir" ] || usage; dir="$a" ;;
  esac
done
[ -n "$dir" ] || usage
command -v kubectl >/dev/null || { echo "make-secrets.sh: kubectl not found" >&2; exit 1; }

need() { [ -f "$1" ] || { echo "make-secrets.sh: $1 is missing (made by: $2)" >&2; exit 1; }; }
need "$dir/ca.pem" "tabby-controller certs init --dir $dir"
need "$dir/server.pem" "tabby-controller certs server --dir $dir --san tabby-controller.tabby-system.svc"
need "$dir/server-key.pem" "tabby-controller certs server --dir $dir --san tabby-controller.tabby-system.svc"

# Checks a certificate's identity (URI SAN) when openssl is there to read it.
check_san() { # file want
  command -v openssl >/dev/null || return 0
  local sans
  sans=$(openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null) || {
    echo "make-secrets.sh: $1 is not a readable certificate" >&2; exit 1; }
  tr ',' '\n' <<<"$sans" | sed 's/^ *//' | grep -qxF "$2" || {
    echo "make-secrets.sh: $1 does not name $2 (it has: $(tr -d '\n' <<<"$sans"))" >&2; exit 1; }
}
check_san "$dir/server.pem" "DNS:tabby-controller.tabby-system.svc"

# Node pairs: node-<name>-key.pem with node-<name>.pem beside it.
node_args=()
nodes=()
shopt -s nullglob
for key in "$dir"/node-*-key.pem; do
  name=${key##*/node-}
  name=${name%-key.pem}
  cert="$dir/node-$name.pem"
  [ -f "$cert" ] || continue # node-<x>-key.pem is the certificate of a node named <x>-key
  if [ "$name" = ca ]; then
    echo "make-secrets.sh: a node named \"ca\" would clash with ca.crt in tabby-nodes-tls" >&2
    exit 1
  fi
  check_san "$cert" "URI:tabby://node/$name"
  node_args+=("--from-file=$name.crt=$cert" "--from-file=$name.key=$key")
  nodes+=("$name")
done
if [ ${#nodes[@]} -eq 0 ]; then
  echo "make-secrets.sh: no node certificates in $dir (make one per node: tabby-controller certs node --dir $dir NODE_NAME)" >&2
  exit 1
fi
echo "make-secrets.sh: ${#nodes[@]} node(s): ${nodes[*]}" >&2

secret() { # name, then kubectl create secret generic arguments
  local name=$1
  shift
  kubectl create secret generic "$name" --namespace "$NAMESPACE" "$@" --dry-run=client -o yaml |
    kubectl label --local -f - app.kubernetes.io/part-of=tabby -o yaml
}

out=$(
  secret "$CONTROLLER_SECRET" \
    --from-file=tls.crt="$dir/server.pem" \
    --from-file=tls.key="$dir/server-key.pem" \
    --from-file=ca.crt="$dir/ca.pem"
  echo "---"
  secret "$NODES_SECRET" \
    --from-file=ca.crt="$dir/ca.pem" \
    "${node_args[@]}"
)

if $apply; then
  kubectl apply --server-side --field-manager=tabby-make-secrets --force-conflicts -f - <<<"$out"
else
  printf '%s\n' "$out"
fi
