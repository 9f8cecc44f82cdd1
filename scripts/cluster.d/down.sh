# Part of scripts/cluster: `down` — stop everything `up` started and put the host back as
# `up` found it (record in $LIB/before). Safe to run at any point, twice, or after a crash.

cgroup_pids() {  # every process of a cgroup tree, in every v1 hierarchy
    for c in /sys/fs/cgroup/*/"$1"; do
        [ -d "$c" ] && find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -u
}

stop() {  # name: SIGTERM, then SIGKILL after 10 s
    p=$(pid_of "$1")
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$p" 2>/dev/null || true
}

kill_tree() {  # cgroup: SIGKILL every process in it until none is left
    for _ in $(seq 1 20); do
        pids=$(cgroup_pids "$1")
        [ -z "$pids" ] && return 0
        # $pids unquoted on purpose: one word per pid.
        kill -KILL $pids 2>/dev/null || true
        sleep 0.5
    done
    echo "scripts/cluster: processes left in cgroup $1: $(cgroup_pids "$1" | tr '\n' ' ')" >&2
}

unmount_ours() {
    # Deepest first; the netns files containerd made under /run/netns; every mount under
    # our state directories (overlay rootfs, shm, kubelet volumes, their propagated copies).
    awk '{print $5}' /proc/self/mountinfo | sed 's/\\040/ /g' | awk -v r="$RUN" -v l="$LIB" '
        index($0, r "/") == 1 || $0 == r || index($0, l "/") == 1 || $0 == l || $0 ~ "^/run/netns/cni-" \
            { print length($0) " " $0 }' | sort -rn | cut -d' ' -f2- |
    while IFS= read -r m; do
        case "$m" in /run/netns/*) grep -qxF "$m" "$LIB/before/entries" 2>/dev/null && continue ;; esac
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "scripts/cluster: cannot unmount $m" >&2
    done
}

remove_links() {
    for l in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
        ip link del "$l" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

restore_sysctls() {
    [ -f "$LIB/before/sysctls" ] || return 0
    while read -r key value; do
        now=$(tr '\t' ' ' <"/proc/sys/$key" 2>/dev/null) || continue
        [ "$now" = "$value" ] && continue
        echo "$value" >"/proc/sys/$key" 2>/dev/null &&
            progress "restored $key: $now -> $value" || echo "scripts/cluster: cannot restore $key ($value)" >&2
    done <"$LIB/before/sysctls"
}

remove_host_paths() {
    b="$LIB/before"
    [ -f "$b/paths" ] || return 0
    # Paths the kubelet, containerd and CNI use whatever they are told: ours if new since `up`.
    for p in $HOST_PATHS; do
        case "$p" in /run/netns|/run/containerd) continue ;; esac
        if [ -e "$p" ] && ! grep -qxF "$p" "$b/paths"; then rm -rf "$p"; fi
    done
    # Shared with everyone (other tests' namespaces, Docker's shims): only what is ours and dead,
    # containerd's pod netns files (cni-*) and shim sockets nobody listens on any more.
    for f in /run/netns/cni-*; do
        if [ -e "$f" ] && ! grep -qxF "$f" "$b/entries"; then rm -f "$f" || true; fi
    done
    for s in /run/containerd/s/*; do
        if [ -S "$s" ] && ! grep -qF " $s" /proc/net/unix; then rm -f "$s"; fi
    done
    for d in /run/containerd/s /run/containerd /run/netns; do
        grep -qxF "$d" "$b/paths" "$b/entries" || rmdir "$d" 2>/dev/null || true
    done
    return 0
}

remove_cgroups() {
    for c in /sys/fs/cgroup/*/"$CGROUP_ROOT" /sys/fs/cgroup/*/"$SYS_CGROUP"; do
        [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
        [ -d "$c" ] && echo "scripts/cluster: cgroup $c left (busy)" >&2
    done
    return 0
}

cmd_down() {
    [ "$(id -u)" = 0 ] || die "down needs root"
    [ -d "$RUN" ] || [ -d "$LIB" ] || { progress "nothing to stop"; return 0; }
    for c in coredns kube-proxy kubelet; do stop "$c"; done
    kill_tree "$CGROUP_ROOT"                      # the pods' processes
    for c in containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
    kill_tree "$SYS_CGROUP"                       # containerd's shims, anything left
    unmount_ours
    remove_links
    python3 scripts/cluster.d/firewall.py restore "$LIB/before/nft-tables" || true
    restore_sysctls
    remove_cgroups
    remove_host_paths
    rm -rf "$RUN" "$LIB"
    progress "down: stopped; host restored"
}
