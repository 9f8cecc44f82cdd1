# Part of scripts/cluster: the cluster's PKI (one CA, a certificate per identity, the
# service-account key) and the kubeconfigs made from it. Fresh on every `up` from scratch.

cert() {  # name subject [subjectAltName]
    d="$LIB/pki"
    [ -f "$d/$1.crt" ] && return 0
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/$1.key" 2>/dev/null
    openssl req -new -key "$d/$1.key" -subj "$2" -out "$d/$1.csr" 2>/dev/null
    ext="$d/$1.ext"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [ -n "${3:-}" ] && echo "subjectAltName=$3"
    } >"$ext"
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 30 -extfile "$ext" -out "$d/$1.crt" 2>/dev/null
    rm -f "$d/$1.csr" "$ext"
}

kubeconfig() {  # file cert-name
    ca=$(base64 -w0 <"$LIB/pki/ca.crt")
    crt=$(base64 -w0 <"$LIB/pki/$2.crt")
    key=$(base64 -w0 <"$LIB/pki/$2.key")
    umask 077
    cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: mirrord-ns
  cluster: {server: "$API", certificate-authority-data: "$ca"}
users:
- name: $2
  user: {client-certificate-data: "$crt", client-key-data: "$key"}
contexts:
- name: mirrord-ns-$2
  context: {cluster: mirrord-ns, user: $2, namespace: default}
current-context: mirrord-ns-$2
KC
    umask 022
}

make_pki() {
    d="$LIB/pki"
    mkdir -p "$d" && chmod 700 "$d"
    if [ ! -f "$d/ca.crt" ]; then
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca.key" 2>/dev/null
        openssl req -x509 -new -key "$d/ca.key" -subj "/CN=mirrord-ns-cluster-ca" -days 30 \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -out "$d/ca.crt" 2>/dev/null
    fi
    [ -f "$d/sa.key" ] || { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/sa.key" 2>/dev/null
                            openssl pkey -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null; }
    cert apiserver "/CN=kube-apiserver" \
        "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    cert admin "/O=system:masters/CN=mirrord-ns-admin"
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cert kubelet "/O=system:nodes/CN=system:node:$NODE" "IP:$NODE_IP,IP:$NODE_IP6,DNS:$NODE"
    cert kube-proxy "/CN=system:kube-proxy"
    cert coredns "/CN=mirrord-ns:coredns"
    cert dev "/CN=dev"
    kubeconfig "$RUN/admin.kubeconfig" admin
    kubeconfig "$RUN/user.kubeconfig" dev
    for c in controller-manager scheduler kubelet kube-proxy coredns; do
        kubeconfig "$RUN/$c.kubeconfig" "$c"
    done
}
