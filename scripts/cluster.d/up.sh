# Part of scripts/cluster: `up` — record what the host looks like, then start the
# components one by one as supervised processes (setsid, pid files, logs in $RUN/log).

record_before() {
    b="$LIB/before"
    [ -d "$b" ] && return 0
    mkdir -p "$b.tmp"
    for s in $SYSCTLS; do
        [ -r "/proc/sys/$s" ] && printf '%s %s\n' "$s" "$(tr '\t' ' ' <"/proc/sys/$s")"
    done >"$b.tmp/sysctls"
    nft list tables >"$b.tmp/nft-tables" 2>/dev/null || true
    for p in $HOST_PATHS; do [ -e "$p" ] && echo "$p"; done >"$b.tmp/paths"
    ls -d /run/netns/* /run/containerd/s/* 2>/dev/null >"$b.tmp/entries" || true
    mv "$b.tmp" "$b"
}

# Start one component in its own session, in the cluster's cgroup of each v1 hierarchy
# that has one (so `down` finds it and every child, containerd's shims included).
start() {  # name command...
    name=$1; shift
    alive "$name" && return 0
    progress "starting $name"
    setsid sh -c 'for c in /sys/fs/cgroup/*/'"$SYS_CGROUP"'/cgroup.procs; do echo $$ >"$c"; done; exec "$@"' \
        sh "$@" >>"$RUN/log/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/pid/$name.pid"
}

# A configuration file from its template with @NAME@ filled in from the variables, replaced
# only when it differs (kube-proxy exits when its file changes; containerd reloads CNI).
render() {  # template destination
    sed -e "s#@RUN@#$RUN#g; s#@LIB@#$LIB#g; s#@NODE_IP@#$NODE_IP#g; s#@NODE@#$NODE#g; s#@DNS_IP@#$DNS_IP#g" \
        -e "s#@BRIDGE@#$BRIDGE#g; s#@POD_CIDR@#$POD_CIDR#g; s#@CGROUP_ROOT@#$CGROUP_ROOT#g" \
        -e "s#@NODE_IP6@#$NODE_IP6#g; s#@POD_CIDR6@#$POD_CIDR6#g" "$1" >"$2.new"
    if cmp -s "$2.new" "$2"; then rm -f "$2.new"; else mv "$2.new" "$2"; fi
}

wait_for() {  # component seconds command...: until command succeeds, while component lives
    what=$1 deadline=$(( $(date +%s) + $2 )); shift 2
    while ! "$@" >/dev/null 2>&1; do
        # Asked twice: while a component's `sh` execs it, /proc/PID/cmdline can read empty for an
        # instant, and a loaded machine (CI) once lost a whole cluster to that false "exited".
        if ! alive "$what" && { sleep 0.5; ! alive "$what"; }; then
            tail -n 20 "$RUN/log/$what.log" >&2 || true
            die "$what exited (log: $RUN/log/$what.log)"
        fi
        if [ "$(date +%s)" -gt "$deadline" ]; then
            tail -n 20 "$RUN/log/$what.log" >&2 || true
            die "$what: no '$*' within its time (log: $RUN/log/$what.log)"
        fi
        sleep 0.5
    done
}

make_bridge() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr show dev "$BRIDGE" | grep -q "inet $NODE_IP/" || ip addr add "$NODE_IP/20" dev "$BRIDGE"
    ip -6 addr show dev "$BRIDGE" | grep -q "inet6 $NODE_IP6/" || ip -6 addr add "$NODE_IP6/64" dev "$BRIDGE" nodad
    ip link set "$BRIDGE" up
    # Forwarding on the bridge alone (IPv4 asks the device a packet came in on), never the host's
    # net.ipv4.ip_forward: every network namespace made meanwhile would inherit that one (the
    # sandbox tests' namespaces among them). Hence also "isGateway": false in the CNI config,
    # since the bridge plugin switches ip_forward on for a gateway; the address is ours already.
    echo 1 >"/proc/sys/net/ipv4/conf/$BRIDGE/forwarding"
    # IPv6 forwards by conf/all only. New namespaces start from IPv6's defaults, not the host's,
    # so this one reaches no test namespace; `down` puts it back.
    echo 1 >/proc/sys/net/ipv6/conf/all/forwarding
    # The Service range goes to the bridge too: a host packet to a ClusterIP that kube-proxy
    # does not translate stays on this host instead of following the default route.
    ip route replace "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
    ip -6 route replace "$SERVICE_CIDR6" dev "$BRIDGE" src "$NODE_IP6"
}

start_etcd() {
    start etcd "$BIN/etcd" --name "$NODE" --data-dir "$LIB/etcd" \
        --listen-client-urls "http://$ETCD_CLIENT" --advertise-client-urls "http://$ETCD_CLIENT" \
        --listen-peer-urls "http://$ETCD_PEER" --initial-advertise-peer-urls "http://$ETCD_PEER" \
        --initial-cluster "$NODE=http://$ETCD_PEER" --listen-metrics-urls "" \
        --quota-backend-bytes 1073741824 --log-level warn
    wait_for etcd 60 curl -sf "http://$ETCD_CLIENT/health"
}

start_apiserver() {
    p=$LIB/pki
    start kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://$ETCD_CLIENT" \
        --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
        --service-cluster-ip-range "$SERVICE_CIDR,$SERVICE_CIDR6" --allow-privileged=true \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --client-ca-file "$p/ca.crt" --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
        --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$p/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority "$p/ca.crt" --kubelet-preferred-address-types InternalIP \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
        --profiling=false --v 1
    wait_for kube-apiserver 120 kubectl get --raw /readyz
}

start_controllers() {
    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$RUN/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$RUN/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$RUN/controller-manager.kubeconfig" \
        --service-account-private-key-file "$LIB/pki/sa.key" --root-ca-file "$LIB/pki/ca.crt" \
        --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1 \
        --cluster-signing-cert-file "$LIB/pki/ca.crt" --cluster-signing-key-file "$LIB/pki/ca.key" \
        --profiling=false --v 1
    start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$RUN/scheduler.kubeconfig" \
        --authentication-kubeconfig "$RUN/scheduler.kubeconfig" \
        --authorization-kubeconfig "$RUN/scheduler.kubeconfig" \
        --leader-elect=false --bind-address 127.0.0.1 --profiling=false --v 1
}

start_containerd() {
    mkdir -p "$RUN/containerd" "$LIB/containerd" "$LIB/cni/net.d"
    render scripts/cluster.d/containerd.toml "$RUN/containerd/config.toml"
    render scripts/cluster.d/cni.conflist "$LIB/cni/net.d/10-mirrord-ns.conflist"
    start containerd /usr/bin/containerd --config "$RUN/containerd/config.toml"
    wait_for containerd 60 ctr --address "$CONTAINERD_SOCK" version
}

import_images() {
    ctrk() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
    have() { ctrk images ls -q | grep -qx "docker.io/library/$1"; }
    t="$RUN/images"; mkdir -p "$t"
    have mirrord-ns-pause:dev || {
        python3 scripts/cluster.d/image-tar.py "$t/pause.tar" mirrord-ns-pause:dev '["/pause"]' "pause=$BIN/pause"
        ctrk images import "$t/pause.tar" >/dev/null; }
    have mirrord-ns-testapp:dev || {
        bb=/bin/busybox; set -- bin/ tmp/ "bin/busybox=$bb"
        for a in $("$bb" --list); do [ "$a" = busybox ] || set -- "$@" "bin/$a->busybox"; done
        python3 scripts/cluster.d/image-tar.py "$t/testapp.tar" mirrord-ns-testapp:dev '["/bin/sh"]' "$@"
        ctrk images import "$t/testapp.tar" >/dev/null; }
    have "${AGENT_IMAGE}" || {
        progress "agent image $AGENT_IMAGE: scripts/docker-up, scripts/build-images, docker save"
        scripts/docker-up
        MIRRORD_NS_IMAGE=$AGENT_IMAGE scripts/build-images  # skipped when the image holds this tree's code
        /usr/bin/docker save "$AGENT_IMAGE" -o "$t/agent.tar"
        scripts/docker-down  # our lease back: a dockerd that docker-up started for this stops
        ctrk images import "$t/agent.tar" >/dev/null; }
    rm -rf "$t"
}

start_node() {
    render scripts/cluster.d/kubelet.yaml "$RUN/kubelet.yaml"
    start kubelet "$BIN/kubelet" --config "$RUN/kubelet.yaml" --kubeconfig "$RUN/kubelet.kubeconfig" \
        --root-dir "$LIB/kubelet" --cert-dir "$LIB/kubelet/pki" --node-ip "$NODE_IP,$NODE_IP6" \
        --hostname-override "$NODE" --v 1
    render scripts/cluster.d/kube-proxy.yaml "$RUN/kube-proxy.yaml"
    start kube-proxy "$BIN/kube-proxy" --config "$RUN/kube-proxy.yaml" --v 1
}

start_dns() {
    render scripts/cluster.d/Corefile "$RUN/Corefile"
    start coredns "$BIN/coredns" -conf "$RUN/Corefile"
    sed -e "s#@DNS_IP@#$DNS_IP#g; s#@NODE_IP@#$NODE_IP#g" scripts/cluster.d/bootstrap.yaml | kubectl apply -f - >/dev/null
    kubectl apply -f deploy/rbac.yaml -f deploy/rbac-env.yaml >/dev/null
    kubectl apply -f scripts/cluster.d/user-rbac.yaml >/dev/null
}

node_ready() {
    kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

dns_answers() {
    busybox nslookup kubernetes.default.svc.cluster.local "$DNS_IP" 2>/dev/null | grep -q "$API_SERVICE_IP"
}

check_host() {
    missing=""
    for b in containerd runc ctr openssl nft ip curl python3 busybox; do
        command -v "$b" >/dev/null 2>&1 || missing="$missing $b"
    done
    [ -x /usr/lib/cni/bridge ] || missing="$missing /usr/lib/cni/bridge"
    [ -d "/sys/fs/cgroup/pids" ] || missing="$missing cgroup-v1-pids-hierarchy"
    [ -z "$missing" ] || die "cannot start, missing:$missing (scripts/apt-ensure containerd runc containernetworking-plugins busybox-static nftables curl openssl)"
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "up needs root"
    scripts/apt-ensure containerd runc containernetworking-plugins busybox-static nftables curl openssl iproute2
    check_host
    cmd_build
    t0=$(date +%s)
    mkdir -p "$RUN/pid" "$RUN/log" "$LIB"
    record_before
    # The kubelet wants its cgroupRoot in every hierarchy; the components go into one of their own.
    for c in /sys/fs/cgroup/*/; do
        [ "$c" = /sys/fs/cgroup/unified/ ] && continue
        mkdir -p "$c$SYS_CGROUP" "$c$CGROUP_ROOT"
    done
    make_pki
    chmod 644 "$RUN/user.kubeconfig"  # read by the invoking user's side of `sudo mirrord-ns`
    make_bridge
    start_etcd
    start_apiserver
    start_controllers
    start_containerd
    import_images
    start_node
    start_dns
    wait_for kubelet 180 node_ready
    wait_for coredns 120 dns_answers
    progress "up in $(( $(date +%s) - t0 )) s: node $NODE Ready, DNS $DNS_IP answers;" \
        "kubeconfigs $RUN/admin.kubeconfig, $RUN/user.kubeconfig"
}
