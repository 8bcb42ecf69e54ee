# tabby: build, test, lint and benchmark entry points.
CARGO   ?= cargo
GRPCURL := $(CURDIR)/target/tools/grpcurl-venv/bin/grpcurl
export TABBY_GRPCURL := $(GRPCURL)

.PHONY: build test lint bench deps run-controller lab lab-containers lab-down images

build:
	$(CARGO) build --release --workspace

deps:
	scripts/install-deps.sh

# Unit, property, gRPC, crash and docs tests. Root-only tests (network
# namespaces) fail loudly when not run as root; they never skip.
test: deps
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

bench: deps
	$(CARGO) build --release --workspace
	$(CARGO) bench -p tabby-controller --bench ipam_grpc
	$(CARGO) bench -p tabby-controller --bench fanout
	$(CARGO) bench -p tabby-controller --bench scale
	$(CARGO) bench -p tabby-controller --bench etcd_ha
	$(CARGO) bench -p tabby-integration --bench route_apply
	$(CARGO) bench -p tabby-integration --bench pod_socket
	$(CARGO) bench -p tabby-integration --bench cni_cycle
	$(CARGO) bench -p tabby-integration --bench convergence
	$(CARGO) bench -p tabby-integration --bench vtep_apply
	$(CARGO) bench -p tabby-integration --bench overlay_throughput
	$(CARGO) bench -p tabby-integration --bench bgp_announce

# The two OCI images (podman, offline, FROM scratch, static binaries):
# localhost/tabby-controller:dev and localhost/tabby-node:dev.
images: deps
	scripts/build-images.sh

# Serves mutual TLS with certificates in ./tabby-certs (made on first run:
# a CA, the controller's for 127.0.0.1, and admin-ops for grpcurl).
run-controller: build
	test -f tabby-certs/ca.pem || { target/release/tabby-controller certs init --dir tabby-certs && \
	  target/release/tabby-controller certs server --dir tabby-certs --san 127.0.0.1 --san localhost && \
	  target/release/tabby-controller certs admin --dir tabby-certs ops; }
	target/release/tabby-controller --listen 127.0.0.1:5151 --data-dir ./tabby-data --bootstrap-pool 10.244.0.0/16 \
	  --tls-cert tabby-certs/server.pem --tls-key tabby-certs/server-key.pem --client-ca tabby-certs/ca.pem

# The three-node lab of the Calico walkthrough, in network namespaces (root).
# TOPOLOGY=racks puts worker2 on a rack (subnet) of its own behind the fabric
# router; MODE=vxlan|vxlan-cross-subnet|ipip|ipip-cross-subnet sets the pool's
# encapsulation (e.g. make lab TOPOLOGY=racks MODE=vxlan-cross-subnet);
# DUAL_STACK=1 adds IPv6 to the fabric and an IPv6 pool; BGP=1 adds a GoBGP
# route reflector on the fabric that the controller peers with.
lab: deps build
	target/release/tabby-lab up $(if $(TOPOLOGY),--topology $(TOPOLOGY)) $(if $(MODE),--mode $(MODE)) $(if $(DUAL_STACK),--dual-stack) $(if $(BGP),--bgp) $(if $(HA),--ha)

# The same lab with the controller and node clients as containers of the
# images (podman, runc, the manifests' mounts and settings).
lab-containers: images build
	target/release/tabby-lab up --containers

lab-down:
	@if [ -x target/release/tabby-lab ]; then target/release/tabby-lab down; else $(CARGO) run -q --release -p tabby-integration --bin tabby-lab -- down; fi
