# Part of scripts/cluster: names, addresses and paths every subcommand shares.
# Address plan (design.md §5): pods and Services inside 198.19.64.0/18, nothing else.
RUN=/run/mirrord-ns-cluster            # pids, logs, sockets, kubeconfigs, containerd state
LIB=/var/lib/mirrord-ns-cluster        # etcd, PKI, kubelet root, containerd root, before-state
BIN="$CACHE/bin"
BRIDGE=mrdk0
NODE_IP=198.19.64.1                    # the bridge's address: node IP, API server, DNS
POD_CIDR=198.19.64.0/20
SERVICE_CIDR=198.19.80.0/20
# Dual-stack: the IPv6 side in fd00::/8, the test plan's IPv6 range.
NODE_IP6=fd00:198:19:64::1
POD_CIDR6=fd00:198:19:64::/64
SERVICE_CIDR6=fd00:198:19:80::/112
API_SERVICE_IP=198.19.80.1
DNS_IP=198.19.80.10
NODE=mirrord-ns-node
API="https://$NODE_IP:6443"
ETCD_CLIENT=127.0.0.1:32379            # not 2379: leave the usual etcd port to anyone else
ETCD_PEER=127.0.0.1:32380
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"
CGROUP_ROOT=mirrord-ns-cluster         # kubelet's cgroupRoot, in every v1 hierarchy
SYS_CGROUP=mirrord-ns-cluster.sys      # the components and containerd's shims
# Started in this order, stopped in the reverse one.
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns"
# What the kubelet, the CNI bridge plugin and kube-proxy may change; `down` puts back each.
SYSCTLS="kernel/panic kernel/panic_on_oops vm/overcommit_memory vm/panic_on_oom
kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward
net/ipv4/conf/all/forwarding net/ipv4/conf/default/forwarding
net/ipv4/conf/all/accept_redirects net/ipv4/conf/default/accept_redirects
net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables
net/bridge/bridge-nf-call-ip6tables net/netfilter/nf_conntrack_max
net/netfilter/nf_conntrack_tcp_timeout_established net/netfilter/nf_conntrack_tcp_timeout_close_wait
net/ipv6/conf/all/forwarding"
# Host paths containerd and CNI use whatever their configuration says.
HOST_PATHS="/run/containerd /run/netns /var/lib/cni /run/cni /etc/cni /opt/containerd /var/log/pods
/var/log/containers /var/lib/kubelet /var/lib/containerd /etc/kubernetes"

progress() { echo "scripts/cluster: $(date -u +%H:%M:%S) $*" >&2; }
die() { echo "scripts/cluster: $*" >&2; exit 1; }
pid_of() { cat "$RUN/pid/$1.pid" 2>/dev/null || true; }
# Alive: that pid runs that component still (not a zombie, not a reused pid).
alive() {
    p=$(pid_of "$1")
    [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "/$1 " &&
        ! grep -q '^State:[[:space:]]*Z' "/proc/$p/status" 2>/dev/null
}
kubectl() { "$BIN/kubectl" --kubeconfig "$RUN/admin.kubeconfig" "$@"; }
