# Veil build. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
BIN := bin
BPFFS ?= /sys/fs/bpf
# Packages the tests need. --no-install-recommends keeps wireguard-tools from
# pulling in a kernel image. runc, the CNI plugins (containerd sets up each
# pod's loopback with one), conntrack and iptables serve the real-kubelet
# lab's nodes.
APT_PACKAGES := clang llvm libbpf-dev bpftool iperf3 wireguard-tools tcpdump iproute2 socat protobuf-compiler nftables \
	runc containernetworking-plugins conntrack iptables busybox-static netcat-openbsd bind9-dnsutils curl
APT_TOOLS := clang llvm-strip bpftool iperf3 wg tcpdump ip socat protoc nft runc conntrack iptables dig curl
# Files of packages that put no tool on PATH (or not under their own name).
APT_FILES := /usr/lib/cni/loopback /usr/bin/busybox /usr/bin/nc.openbsd
GO_TEST_FLAGS ?= -count=1 -timeout 45m

.PHONY: help deps bpffs generate generate-bpf generate-api generate-crds check-generate build test test-unit bench lab clean controlplane controlplane-lab manifests image

help:
	@echo "make deps            install the toolchain (Debian packages) and mount bpffs"
	@echo "make generate        regenerate bpf2go, deepcopy, clientset and CRD YAML"
	@echo "make check-generate  fail when committed generated files are stale"
	@echo "make build           static binaries in $(BIN)/"
	@echo "make manifests       render deploy/manifests from the Helm chart in deploy/helm/veil"
	@echo "make image           the agent image as an OCI tarball, $(BIN)/veil-image.tar (no Docker daemon)"
	@echo "make test            unit + privileged tests (needs root), then unit tests of concurrent packages under -race"
	@echo "make controlplane    build the lab's Kubernetes and containerd binaries into the cache (\$$VEIL_CACHE)"
	@echo "                     (controlplane-lab: only what the lab runs, without the upstream e2e set)"
	@echo "make bench           benchmarks, printed as ratios against side-by-side baselines"
	@echo "make lab             run Veil in the local real-cluster lab as root (meshctl lab up; LAB_NODES, LAB_KUBE_PROXY, LAB_DIR)"
	@echo "make conformance     upstream [sig-network] e2e tests on a 2-node lab with Veil (CONFORMANCE=all|conformance|netpol|netpol-all, CONFORMANCE_MODES=nftables,none)"

deps:
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	for f in $(APT_FILES); do test -e $$f || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing toolchain (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@$(MAKE) --no-print-directory bpffs

bpffs:
	@mountpoint -q $(BPFFS) || mount -t bpf bpf $(BPFFS)

# manifests come last: the chart carries copies of the CRDs.
generate: generate-bpf generate-crds generate-api
	$(MAKE) --no-print-directory manifests

generate-bpf:
	$(GO) generate ./agent/datapath/...

# The agent's gRPC API; protoc comes from Debian (make deps), the Go plugins
# are go.mod tools.
generate-api:
	protoc --plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--plugin=protoc-gen-go-grpc="$$($(GO) tool -n protoc-gen-go-grpc)" \
		--go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		api/agent/v1/agent.proto

# The CRD APIs (api/policy: MeshPolicy, ClusterMeshPolicy; api/mesh:
# MeshNode): deepcopy, one clientset with listers and informers for both
# groups from k8s.io/code-generator, CRD YAML from controller-gen; all are
# go.mod tools.
CRD_API_PKGS := github.com/veilmesh/veil/api/policy/v1alpha1 github.com/veilmesh/veil/api/mesh/v1alpha1
CRD_CLIENT_PKG := github.com/veilmesh/veil/api/client
CRD_BOILERPLATE := api/boilerplate.go.txt

generate-crds:
	rm -rf api/client
	rm -f api/policy/v1alpha1/zz_generated.deepcopy.go api/mesh/v1alpha1/zz_generated.deepcopy.go \
		deploy/crds/policy.veil.dev_*.yaml deploy/crds/mesh.veil.dev_*.yaml
	$(GO) tool deepcopy-gen --go-header-file $(CRD_BOILERPLATE) \
		--output-file zz_generated.deepcopy.go $(CRD_API_PKGS)
	$(GO) tool client-gen --go-header-file $(CRD_BOILERPLATE) \
		--clientset-name versioned --input-base "" $(addprefix --input ,$(CRD_API_PKGS)) \
		--output-dir api/client/clientset --output-pkg $(CRD_CLIENT_PKG)/clientset
	$(GO) tool lister-gen --go-header-file $(CRD_BOILERPLATE) \
		--output-dir api/client/listers --output-pkg $(CRD_CLIENT_PKG)/listers \
		$(CRD_API_PKGS)
	$(GO) tool informer-gen --go-header-file $(CRD_BOILERPLATE) \
		--versioned-clientset-package $(CRD_CLIENT_PKG)/clientset/versioned \
		--listers-package $(CRD_CLIENT_PKG)/listers \
		--output-dir api/client/informers --output-pkg $(CRD_CLIENT_PKG)/informers \
		$(CRD_API_PKGS)
	$(GO) tool controller-gen crd paths=./api/policy/... paths=./api/mesh/... output:crd:artifacts:config=deploy/crds

# The lab's and the tests' etcd and kube-apiserver, and the real-kubelet
# lab's kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
# containerd, and the upstream conformance set (e2e.test, agnhost, kubectl),
# built from the modules pinned in lab/controlplane/build/ into
# $VEIL_CACHE/controlplane (default ~/.cache/veil/controlplane); a no-op when
# the cache is warm. A cold build takes about 25 minutes on two cores (see
# lab/controlplane/doc.go).
# controlplane-lab is what the lab runs; controlplane adds the upstream e2e
# set (e2e.test, agnhost, kubectl) the conformance tests need.
controlplane: controlplane-lab
	$(GO) run ./lab/controlplane/cmd/veil-controlplane e2e

controlplane-lab:
	$(GO) run ./lab/controlplane/cmd/veil-controlplane build

check-generate: generate
	@if [ -n "$$(git status --porcelain)" ]; then \
		echo "generated files are stale; run 'make generate' and commit:"; git status --porcelain; exit 1; \
	fi

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./agent/cmd/... ./meshctl/cmd/...

# deploy/manifests, the chart's crds/ and deploy/kustomization.yaml are
# generated from the chart and deploy/crds; a test checks they are current.
manifests:
	$(GO) run ./deploy/cmd/veil-manifests -deploy deploy

# The agent image (veil-agent, veil-cni, veil-install-cni), built from static
# binaries with go-containerregistry and written as an OCI image layout
# tarball: load it with `ctr -n k8s.io images import` or `docker load`.
VERSION ?= 0.1.0
IMAGE ?= ghcr.io/veilmesh/veil:$(VERSION)
IMAGE_BIN := $(BIN)/image
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X github.com/veilmesh/veil/agent/daemon.Version=$(VERSION)" \
		-o $(IMAGE_BIN)/ ./agent/cmd/veil-agent ./agent/cmd/veil-cni ./deploy/cmd/veil-install-cni
	$(GO) run ./deploy/image -o $(BIN)/veil-image.tar --tag $(IMAGE) \
		--agent $(IMAGE_BIN)/veil-agent --cni $(IMAGE_BIN)/veil-cni --install-cni $(IMAGE_BIN)/veil-install-cni

# Packages whose code runs goroutines that share state (informer handlers,
# workqueues, gRPC servers, readers beside updates): their unit tests run
# again under the race detector. Without VEIL_PRIVILEGED, so only the fast
# unit tests run (the privileged ones skip).
RACE_PACKAGES := ./agent/daemon/... ./agent/apiserver/... ./agent/endpoints/... ./agent/encryption/... ./agent/flows/... ./agent/k8s/... ./agent/policysync/... ./agent/services/... ./agent/cni/... ./agent/ipam/... ./meshctl/... ./policy/... ./lab/...

test: deps
	$(GO) vet ./...
	VEIL_PRIVILEGED=1 $(GO) test $(GO_TEST_FLAGS) ./...
	env -u VEIL_PRIVILEGED $(GO) test -race $(GO_TEST_FLAGS) $(RACE_PACKAGES)

test-unit:
	$(GO) test $(GO_TEST_FLAGS) ./...

bench: deps
	@mkdir -p $(BIN)
	@rm -f $(BIN)/bench.json
	BENCH_JSON=$${BENCH_JSON:-$(CURDIR)/$(BIN)/bench.json} VEIL_PRIVILEGED=1 \
		$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./...
	@$(GO) run ./tests/benchreport/cmd/benchtable $${BENCH_JSON:-$(CURDIR)/$(BIN)/bench.json}

# The local lab, left running: a real Kubernetes cluster (control plane,
# nodes with kubelet, containerd and kube-proxy), Veil installed from its
# chart with the image of `make image`, cluster DNS, and the demo
# (Deployments, Services, policies). The first run builds the cluster's
# binaries (make controlplane: up to 30 min); later runs take about 30 s.
# `$(BIN)/meshctl lab down` removes it. LAB_KUBE_PROXY: none, iptables or nftables.
LAB_NODES ?= 2
LAB_KUBE_PROXY ?= nftables
lab: deps build image controlplane-lab
	$(BIN)/meshctl lab up --nodes $(LAB_NODES) --kube-proxy $(LAB_KUBE_PROXY) --image $(BIN)/veil-image.tar $(if $(LAB_DIR),--dir $(LAB_DIR))

# The upstream Kubernetes e2e tests of [sig-network] tagged [Conformance],
# and a NetworkPolicy subset, on a 2-node lab with Veil (strict encryption),
# as root, once per kube-proxy mode (CONFORMANCE_MODES: nftables, none,
# iptables, nftables-n2n; default nftables,none); results in
# $(BIN)/conformance/results.md (see tests/conformance).
# The first run builds e2e.test, agnhost and kubectl into the control-plane
# cache (make controlplane); the agnhost image is put together from Debian's
# busybox, curl, netcat, iproute2 and dig (make deps).
.PHONY: conformance
CONFORMANCE ?= all
CONFORMANCE_MODES ?= nftables,none
# 1: every mode's lab and every suite at once (17 min measured); 0: one
# after the other (up to modes × suites × 25 min).
CONFORMANCE_PARALLEL ?= 1
conformance: deps controlplane
	VEIL_PRIVILEGED=1 VEIL_CONFORMANCE=$(CONFORMANCE) VEIL_CONFORMANCE_MODES=$(CONFORMANCE_MODES) VEIL_CONFORMANCE_PARALLEL=$(CONFORMANCE_PARALLEL) $(GO) test -count=1 -timeout 150m -v -run '^TestPrivilegedConformance$$' ./tests/conformance

clean:
	rm -rf $(BIN)
