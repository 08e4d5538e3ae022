#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# TLS in front of the plugin, over loopback TCP, with the client users
# actually attach: QEMU's nbd driver (here qemu-io) with tls-creds objects.
# Two ways of authenticating, each on its own server with --tls=require:
#   psk   a pre-shared key file (username:hexkey lines), the same file for
#         nbdkit --tls-psk and for qemu's tls-creds-psk (dir/keys.psk)
#   x509  a throw-away CA, a server certificate for 127.0.0.1/localhost and
#         a client certificate, made with openssl; nbdkit checks the client
#         certificate (--tls-verify-peer), qemu checks the server's
# For each: a plaintext client and a client with the wrong credentials are
# refused while the right ones are accepted; the data written through TLS
# allocates host space and a discard through TLS gives it back (host file
# allocation, statsfile); the image is clean afterwards.
#
# TLS changes nothing in the plugin; what this guards is that the documented
# deployment (systemd/README.md, NBDKIT_ARGS="--tls=require ...") works and
# that discards still reach the engine through QEMU's TLS client.
set -eu
srcdir=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
. "$srcdir/functions.sh"

requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires nbdinfo --version
nbdkit --dump-config | grep -qx 'tls=yes' || skip "nbdkit was built without GnuTLS"

alloc_of() { echo $(( $(stat -c %b "$1") * 512 )); }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# tls_server NAME IMAGE NBDKIT-TLS-OPTIONS...: serve IMAGE on a free
# loopback port; sets PORT and SPID.  Another process can take the port
# between choosing it and nbdkit binding it, so a bind failure is retried.
tls_server() {
    local name=$1 img=$2; shift 2
    local log=$TMP/$name.log pidfile=$TMP/$name.pid
    for _ in 1 2 3 4 5; do
        PORT=$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        rm -f "$pidfile"
        # -i 127.0.0.1: nothing outside this machine can reach the test server.
        nbdkit -f -v -P "$pidfile" -i 127.0.0.1 -p "$PORT" "$@" \
            "$PLUGIN" file="$img" statsfile="$TMP/$name.stats" >"$log" 2>&1 &
        SPID=$!
        track_pid "$SPID"
        # nbdkit writes the pidfile once it is listening.
        for _ in $(seq 1 200); do
            [ -s "$pidfile" ] && return 0
            kill -0 "$SPID" 2>/dev/null || break
            sleep 0.05
        done
        stop_server "$SPID"
        grep -q 'Address already in use' "$log" || { cat "$log" >&2; fail "$name: nbdkit did not start"; }
    done
    fail "$name: no free port after 5 tries"
}

# qio NAME OBJECT HOST COMMAND...: qemu-io through QEMU's NBD client with the
# TLS credentials object OBJECT (id tls0).  Older qemu-io exits 0 when a
# command fails, so its output is checked too.
qio() {
    local name=$1 object=$2 host=$3 out; shift 3
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io --object "$object" \
              --image-opts "driver=nbd,server.type=inet,server.host=$host,server.port=$PORT,tls-creds=tls0" \
              "${args[@]}" 2>&1) ||
        { echo "$out" >&2; cat "$TMP/$name.log" >&2; fail "$name: qemu-io failed"; }
    if grep -q -i -e 'fail' -e 'error' <<<"$out"; then
        echo "$out" >&2; fail "$name: qemu-io reported a failure"
    fi
}

# refused NAME WHAT PATTERN URI: nbdinfo must fail to connect, and the
# server's log must say why (a line matching PATTERN that was not there
# before), so that a refusal for some unrelated reason does not pass.
refused() {
    local name=$1 what=$2 pattern=$3 uri=$4 out before why=
    local log=$TMP/$name.log
    before=$(wc -l <"$log")
    if out=$(nbdinfo "$uri" 2>&1); then
        echo "$out" >&2; fail "$name: $what was accepted"
    fi
    # The server may log its side a moment after the client has given up.
    for _ in $(seq 1 40); do
        why=$(tail -n +"$((before + 1))" "$log" | grep -m1 -e "$pattern") && break
        sleep 0.05
    done
    [ -n "$why" ] ||
        { echo "$out" >&2; cat "$log" >&2; fail "$name: $what was refused, but not for the expected reason ($pattern)"; }
    echo "server: ${why#nbdkit: *: }"
}

# exercise NAME OBJECT HOST IMAGE: the qemu-io sequence through TLS, with
# the host file's allocation measured after the write and after the discard.
exercise() {
    local name=$1 object=$2 host=$3 img=$4
    local a0 a1 a2 punched
    a0=$(alloc_of "$img")
    qio "$name" "$object" "$host" 'write -P 0x5a 0 8M' 'flush'
    a1=$(alloc_of "$img")
    [ "$a1" -ge $(( a0 + 8 * 1048576 )) ] ||
        fail "$name: allocation after writing 8 MiB through TLS is $(mib "$a1") (was $(mib "$a0"))"
    echo "ok: $name: qemu-io write 8 MiB over TLS: host allocation $(mib "$a0") -> $(mib "$a1")"

    qio "$name" "$object" "$host" 'discard 0 4M' 'flush' 'read -P 0 0 4M' 'read -P 0x5a 4M 4M'
    # The discard punched at once, but compaction then starts (the file is
    # now twice what it holds) and copies the upper half down before it
    # punches it: while it runs, the allocation is higher again, and the
    # tables it moved may end up using a few host blocks more (two clusters
    # of slack).
    local want=$(( a1 - 4 * 1048576 + 2 * 65536 ))
    for _ in $(seq 1 200); do
        a2=$(alloc_of "$img")
        [ "$a2" -gt "$want" ] || break
        sleep 0.1
    done
    [ "$a2" -le "$want" ] ||
        fail "$name: allocation after discarding 4 MiB through TLS is $(mib "$a2") (was $(mib "$a1"))"
    punched=$(sed -n 's/^bytes_punched=//p' "$TMP/$name.stats")
    [ "${punched:-0}" -ge $(( 4 * 1048576 )) ] ||
        fail "$name: statsfile shows bytes_punched=${punched:-none}, want >= 4 MiB"
    echo "ok: $name: qemu-io discard 4 MiB over TLS: host allocation $(mib "$a1") -> $(mib "$a2"), bytes_punched=$punched, both halves read back"
}

# finish NAME IMAGE: stop the server (writes back) and check the image.
finish() {
    stop_server "$SPID"
    check_clean "$2"
    echo "ok: $1: server stopped, qemu-img check clean"
}

# ---- PSK ----------------------------------------------------------------------
# psktool (gnutls-bin) would write the same line; 32 random bytes in hex.
pskdir=$TMP/psk
mkdir -m 0700 "$pskdir" "$TMP/psk-wrong"
echo "alice:$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$pskdir/keys.psk"
echo "alice:$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$TMP/psk-wrong/keys.psk"
chmod 0600 "$pskdir/keys.psk" "$TMP/psk-wrong/keys.psk"

img=$TMP/psk.qcow2
qemu-img create -q -f qcow2 "$img" 64M
tls_server psk "$img" --tls=require --tls-psk="$pskdir/keys.psk"
echo "ok: psk: nbdkit --tls=require --tls-psk listening on 127.0.0.1:$PORT"

plain=$(refused psk "a client without TLS" 'NBD_OPT_GO with NBD_REP_ERR_TLS_REQD' \
            "nbd://127.0.0.1:$PORT")
wrong=$(refused psk "a client with the wrong key" 'gnutls_handshake' \
            "nbds://alice@127.0.0.1:$PORT?tls-psk-file=$TMP/psk-wrong/keys.psk")
size=$(nbdinfo --size "nbds://alice@127.0.0.1:$PORT?tls-psk-file=$pskdir/keys.psk" 2>&1) ||
    { echo "$size" >&2; fail "psk: a client with the right key was refused"; }
echo "ok: psk: plaintext refused ($plain)"
echo "ok: psk: wrong key refused ($wrong); right key accepted (export size $size)"

exercise psk "tls-creds-psk,id=tls0,endpoint=client,dir=$pskdir,username=alice" 127.0.0.1 "$img"
finish psk "$img"

# ---- X.509 --------------------------------------------------------------------
# openssl rather than certtool: it is on far more machines.  RSA keys and
# explicit key usages, because QEMU checks the CA and client certificates it
# loads (CA:TRUE + keyCertSign; CA:FALSE, digitalSignature+keyEncipherment,
# clientAuth), and the server certificate must name the address the client
# dials: both 127.0.0.1 and localhost are used below.
requires openssl version
pki=$TMP/pki
mkdir -m 0700 "$pki" "$pki/server" "$pki/client" "$pki/anonymous"
cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
ossl() { local out; out=$(openssl "$@" 2>&1) || { echo "$out" >&2; fail "openssl $1 failed"; }; }
ossl req -x509 -config "$pki/openssl.cnf" -extensions ca -newkey rsa:2048 -nodes \
    -keyout "$pki/ca-key.pem" -out "$pki/ca-cert.pem" -days 2 -subj "/CN=qcow2reclaim test CA"
serial=1
for role in server client; do
    cn=localhost; [ "$role" = client ] && cn=alice
    ossl req -new -config "$pki/openssl.cnf" -newkey rsa:2048 -nodes \
        -keyout "$pki/$role/$role-key.pem" -out "$pki/$role.csr" -subj "/CN=$cn"
    ossl x509 -req -in "$pki/$role.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" \
        -set_serial $((serial++)) -days 2 -extfile "$pki/openssl.cnf" -extensions "$role" \
        -out "$pki/$role/$role-cert.pem"
    cp "$pki/ca-cert.pem" "$pki/$role/"
done
# A client that trusts the CA but has no certificate of its own.
cp "$pki/ca-cert.pem" "$pki/anonymous/"
# A client that trusts another CA only: it must not accept our server.
mkdir -m 0700 "$pki/stranger"
ossl req -x509 -config "$pki/openssl.cnf" -extensions ca -newkey rsa:2048 -nodes \
    -keyout "$pki/stranger/ca-key.pem" -out "$pki/stranger/ca-cert.pem" -days 2 -subj "/CN=another CA"
echo "ok: x509: CA, server (127.0.0.1, localhost) and client certificates made with openssl"

img=$TMP/x509.qcow2
qemu-img create -q -f qcow2 "$img" 64M
tls_server x509 "$img" --tls=require --tls-certificates="$pki/server" --tls-verify-peer
echo "ok: x509: nbdkit --tls=require --tls-certificates --tls-verify-peer listening on 127.0.0.1:$PORT"

plain=$(refused x509 "a client without TLS" 'NBD_OPT_GO with NBD_REP_ERR_TLS_REQD' \
            "nbd://127.0.0.1:$PORT")
anon=$(refused x509 "a client without a certificate" 'gnutls_handshake' \
           "nbds://127.0.0.1:$PORT?tls-certificates=$pki/anonymous")
size=$(nbdinfo --size "nbds://127.0.0.1:$PORT?tls-certificates=$pki/client" 2>&1) ||
    { echo "$size" >&2; fail "x509: a client with a valid certificate was refused"; }
echo "ok: x509: plaintext refused ($plain)"
echo "ok: x509: client without certificate refused ($anon); with one accepted (export size $size)"

# qemu verifies the server by default (verify-peer=on for a client endpoint);
# without that the certificates above would only encrypt, not authenticate.
if out=$(qemu-io --object "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/stranger" \
             --image-opts "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$PORT,tls-creds=tls0" \
             -c 'read 0 4k' 2>&1); then
    echo "$out" >&2; fail "x509: qemu accepted a server certificate from a CA it does not trust"
fi
echo "ok: x509: qemu trusting another CA refuses the server ($(head -n1 <<<"$out"))"

exercise x509 "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client" 127.0.0.1 "$img"
# The same through the DNS name, as a client configured with a host name would.
qio x509 "tls-creds-x509,id=tls0,endpoint=client,dir=$pki/client" localhost 'read -P 0 0 4M' 'read -P 0x5a 4M 4M'
echo "ok: x509: qemu-io via server.host=localhost verifies the server certificate and reads the data"
finish x509 "$img"
