# Part of scripts/cluster: build the cluster's binaries once, cached by version outside the
# clone, from the Go module proxy. Sourced by scripts/cluster (needs K8S_VERSION, CACHE).
# Each go build runs alone and nice'd: the machines have 2 cores shared with other work.

ETCD_VERSION=${ETCD_VERSION:-v3.6.17}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
KUBE_CMDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"

progress() { echo "scripts/cluster: $(date -u +%H:%M:%S) $*" >&2; }

go_env() {
    export GOMODCACHE="$CACHE/gomod" GOCACHE="$CACHE/gocache" GOFLAGS="-trimpath -buildvcs=false -mod=mod"
    export CGO_ENABLED=0 GOTOOLCHAIN=local
}

# A module of our own that requires k8s.io/kubernetes and replaces each staging module
# (its go.mod says v0.0.0 => ./staging/...) with the published v0.<minor>.<patch>.
kube_module() {
    src="$CACHE/src/kube"
    [ -f "$src/go.mod" ] && return 0
    mkdir -p "$src"
    gomod=$(cd "$src" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    staging_version="v0.${K8S_VERSION#v1.}"
    {
        echo "module mirrord-ns.local/kube"
        echo "go $("$GO" env GOVERSION | sed 's/^go\([0-9]*\.[0-9]*\).*/\1/')"
        echo "require k8s.io/kubernetes $K8S_VERSION"
        sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#replace \1 => \1 '"$staging_version"'#p' "$gomod"
    } >"$src/go.mod.new"
    mv "$src/go.mod.new" "$src/go.mod"
}

build_kube() {
    kube_module
    pkgs=""
    for c in $KUBE_CMDS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$c"; done
    minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    ldflags="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags="$ldflags -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        ldflags="$ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    progress "resolving every module k8s.io/kubernetes $K8S_VERSION needs (go mod download)"
    (cd "$CACHE/src/kube" && "$GO" list -deps $pkgs >/dev/null) || {
        echo "scripts/cluster: a module of k8s.io/kubernetes $K8S_VERSION could not be fetched (above)" >&2; return 1; }
    progress "building $KUBE_CMDS (cold: 20-40 min on 2 cores)"
    (cd "$CACHE/src/kube" && nice -n 10 "$GO" build -ldflags "$ldflags" -o "$CACHE/bin.tmp/" $pkgs)
}

# etcd's and CoreDNS's go.mod carry replace directives, so `go install mod@v` refuses them:
# the same kind of wrapper module, requiring the main module at a version.
build_wrapped() {  # name module version package
    src="$CACHE/src/$1"
    mkdir -p "$src"
    [ -f "$src/go.mod" ] || printf 'module mirrord-ns.local/%s\ngo %s\nrequire %s %s\n' \
        "$1" "$("$GO" env GOVERSION | sed 's/^go\([0-9]*\.[0-9]*\).*/\1/')" "$2" "$3" >"$src/go.mod"
    progress "building $1 ($2 $3)"
    (cd "$src" && nice -n 10 "$GO" build -ldflags "-s -w" -o "$CACHE/bin.tmp/$1" "$4")
}

# pause: the sandbox's init, a static program that sleeps until a signal (there is no
# registry to pull registry.k8s.io/pause from).
build_pause() {
    src="$CACHE/src/pause"
    mkdir -p "$src"
    printf 'module mirrord-ns.local/pause\ngo 1.22\n' >"$src/go.mod"
    cat >"$src/main.go" <<'GOEOF'
// pause: the pod sandbox's first process; it reaps nothing and waits for SIGTERM/SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
GOEOF
    (cd "$src" && nice -n 10 "$GO" build -ldflags "-s -w" -o "$CACHE/bin.tmp/pause" .)
}

cmd_build() {
    if [ -f "$CACHE/bin/.complete" ]; then
        progress "binaries cached in $CACHE/bin"; return 0
    fi
    [ -x "$GO" ] || { echo "scripts/cluster: no Go toolchain (need go >= 1.25 at /usr/local/go/bin/go or on PATH)" >&2; return 1; }
    mkdir -p "$CACHE/bin.tmp"
    go_env
    start=$(date +%s)
    [ -x "$CACHE/bin.tmp/pause" ] || build_pause
    [ -x "$CACHE/bin.tmp/kubelet" ] || build_kube
    [ -x "$CACHE/bin.tmp/etcd" ] || build_wrapped etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3
    [ -x "$CACHE/bin.tmp/coredns" ] || build_wrapped coredns github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns
    rm -rf "$CACHE/bin"
    mv "$CACHE/bin.tmp" "$CACHE/bin"
    echo "$(( $(date +%s) - start ))" >"$CACHE/bin/.complete"
    progress "built in $(( $(date +%s) - start )) s into $CACHE/bin"
}
