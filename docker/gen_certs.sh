#!/usr/bin/env bash
# Make a demo CA and a SuperLink server certificate for docker/compose.tls.yml.
#
#   docker/gen_certs.sh [OUT_DIR] [EXTRA_SAN ...]     # default OUT_DIR: docker/certs (git-ignored)
#
# Writes ca.crt/ca.key (the CA), server.pem/server.key (the SuperLink's certificate, with
# subject alternative names DNS:superlink, DNS:localhost, IP:127.0.0.1, IP:::1 plus any
# EXTRA_SAN given as DNS:name or IP:a.b.c.d, e.g. the SuperLink's public name on real
# machines). Skips generation when OUT_DIR/ca.crt exists (FORCE=1 regenerates).
#
# The keys are made readable by the containers' non-root user (uid 49999): fine for a demo
# on one machine. For a real deployment keep ca.key off the servers, and give server.key
# to the SuperLink's user only (chown 49999, chmod 0400).
set -euo pipefail

OUT=${1:-$(cd "$(dirname "$0")" && pwd)/certs}
shift || true
if [ -f "$OUT/ca.crt" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "certificates exist in $OUT (FORCE=1 regenerates)"
    exit 0
fi
command -v openssl >/dev/null || {
    echo "openssl is needed (apt-get install openssl)" >&2
    exit 1
}
mkdir -p "$OUT"
SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
for san in "$@"; do SANS="$SANS,$san"; done

cat >"$OUT/server.conf" <<EOF
[req]
default_bits = 4096
prompt = no
default_md = sha256
req_extensions = req_ext
distinguished_name = dn

[dn]
O = FedPrime demo
CN = superlink

[req_ext]
subjectAltName = $SANS
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
EOF

openssl genrsa -out "$OUT/ca.key" 4096 2>/dev/null
openssl req -new -x509 -key "$OUT/ca.key" -sha256 -days 365 \
    -subj "/O=FedPrime demo/CN=FedPrime demo CA" -out "$OUT/ca.crt"
openssl genrsa -out "$OUT/server.key" 4096 2>/dev/null
openssl req -new -key "$OUT/server.key" -out "$OUT/server.csr" -config "$OUT/server.conf"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -out "$OUT/server.pem" -days 365 -sha256 -extfile "$OUT/server.conf" -extensions req_ext 2>/dev/null
rm -f "$OUT/server.csr"
chmod 0644 "$OUT/ca.crt" "$OUT/server.pem" "$OUT/server.key"
chmod 0600 "$OUT/ca.key"
echo "wrote $OUT: ca.crt, server.pem, server.key (SANs: $SANS)"
