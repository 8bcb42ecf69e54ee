#!/usr/bin/env bash
# `make images`: builds localhost/tabby-controller:dev and
# localhost/tabby-node:dev with podman, offline:
#  - static binaries (glibc, -C target-feature=+crt-static) from the
#    toolchain already here, into target/static;
#  - FROM scratch images, built with --network=none --pull=never;
#  - the node image carries the `tabby` plugin and its conflist under
#    /opt/tabby (for `tabby-node install-cni`) and this machine's `nft` with
#    exactly the libraries it links.
# Podman runs with a containers.conf of the project's own (runc, default
# ulimits that need no raising, no events log).
set -euo pipefail
cd "$(dirname "$0")/.."
T=x86_64-unknown-linux-gnu
OUT=target/images
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/static \
  cargo build --release --target "$T" -p tabby-controller -p tabby-node -p tabby-cni
B=target/static/$T/release
for b in tabby-controller tabby-node tabby; do
  # A static binary asks for no program interpreter (dynamic loader).
  if readelf -l "$B/$b" | grep -q 'program interpreter'; then echo "$B/$b is not static" >&2; exit 1; fi
done
rm -rf "$OUT"
mkdir -p "$OUT/controller" "$OUT/node/rootfs/opt/tabby/bin" "$OUT/tmp"
cp images/controller.Containerfile "$OUT/controller/Containerfile"
cp "$B/tabby-controller" "$OUT/controller/"
R=$OUT/node/rootfs
cp images/node.Containerfile "$OUT/node/Containerfile"
cp "$B/tabby-node" "$R/tabby-node"
cp "$B/tabby" "$R/opt/tabby/bin/tabby"
cp cni-shim/10-tabby.conflist "$R/opt/tabby/10-tabby.conflist"
NFT=$(command -v nft)
mkdir -p "$R$(dirname "$NFT")"
cp -L "$NFT" "$R$NFT"
# The loader and every library nft links, at the paths it looks them up.
for lib in $(ldd "$NFT" | awk '/=> \// {print $3} /^\s*\/.*ld-linux/ {print $1}'); do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done
# The loader's canonical path, where nft's interpreter points.
LD=$(readelf -l "$NFT" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
mkdir -p "$R$(dirname "$LD")"
cp -L "$LD" "$R$LD"
cat > "$OUT/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "$PWD/$OUT/tmp"
CONF
export CONTAINERS_CONF=$PWD/$OUT/containers.conf
podman build --network=none --pull=never -q -t localhost/tabby-controller:dev "$OUT/controller"
podman build --network=none --pull=never -q -t localhost/tabby-node:dev "$OUT/node"
podman image ls --filter reference='localhost/tabby-*' --format '{{.Repository}}:{{.Tag}} {{.Size}}'
# Smoke check, offline: each binary runs in its image, nft runs with its
# libraries, and the node image's installer fills a pair of CNI directories.
podman run --rm --network=none localhost/tabby-controller:dev --version
podman run --rm --network=none localhost/tabby-node:dev --version
podman run --rm --network=none --entrypoint "$NFT" localhost/tabby-node:dev --version
CNI=$(mktemp -d)
trap 'rm -rf "$CNI"' EXIT
mkdir -p "$CNI/bin" "$CNI/net.d"
podman run --rm --network=none -v "$CNI/bin:/host/opt/cni/bin" -v "$CNI/net.d:/host/etc/cni/net.d" \
  localhost/tabby-node:dev install-cni
test -x "$CNI/bin/tabby" && test -s "$CNI/net.d/10-tabby.conflist"
echo "images OK"
