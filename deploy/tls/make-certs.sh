#!/usr/bin/env bash
# Makes a cluster CA, one certificate per node and one operator (client)
# certificate, for multiraft's TLS flags. For tests and small deployments;
# a production cluster would issue the same shapes from its own CA.
#
#   deploy/tls/make-certs.sh OUT_DIR NODE[=IP,IP...] ...
#
#   deploy/tls/make-certs.sh ./certs 1 2 3
#   deploy/tls/make-certs.sh ./certs 1=10.0.0.1 2=10.0.0.2 3=10.0.0.3
#
# Writes into OUT_DIR (an existing CA there is reused, so nodes can be
# added later):
#   ca.pem, ca.key               the cluster CA (keep ca.key offline)
#   node-ID.pem, node-ID.key     node ID: DNS names node-ID and localhost,
#                                IP 127.0.0.1 and the IPs given; usable as
#                                server and as client (peers authenticate
#                                each other with it)
#   client.pem, client.key       an operator certificate for control calls
#
# A node's certificate must name it as DNS:node-ID: that name is how peers
# know which node a connection comes from.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1
shift
mkdir -p "$out"
cd "$out"
days=825

if [ ! -f ca.pem ] || [ ! -f ca.key ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=multiraft cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
fi

# issue NAME SUBJECT_CN EXTENSIONS
issue() {
  local name=$1 cn=$2 ext=$3
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key" 2>/dev/null
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  printf '%s\n' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days "$days" -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  chmod 600 "$name.key"
}

for spec in "$@"; do
  id=${spec%%=*}
  case $id in
    '' | *[!0-9]*) echo "bad node id in '$spec'" >&2; exit 2 ;;
  esac
  san="DNS:node-$id,DNS:localhost,IP:127.0.0.1"
  if [ "$spec" != "$id" ]; then
    IFS=, read -ra ips <<<"${spec#*=}"
    for ip in "${ips[@]}"; do san="$san,IP:$ip"; done
  fi
  issue "node-$id" "multiraft node $id" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
  echo "node $id: $out/node-$id.pem ($san)"
done

if [ ! -f client.pem ]; then
  issue client "multiraft operator" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=DNS:multiraft-operator"
  echo "operator: $out/client.pem"
fi
chmod 600 ca.key
