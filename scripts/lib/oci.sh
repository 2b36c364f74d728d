# Shell helpers the benchmark scripts share (sourced): OCI image layouts written by
# hand (GNU tar, gzip -1) and a docker-registry of their own with an access log.

# One gzip layer of directory $1, its entries under prefix $2 (`.` or `./data`), as a
# blob in the directory of $3 (a scratch path there); prints "digest size diff_id".
oci_layer() {
  local src=$1 prefix=$2 out=$3
  tar --numeric-owner --transform "s,^\\.,$prefix," -C "$src" -cf - . >"$out.tar"
  local diff_id size digest
  diff_id=$(sha256sum "$out.tar" | cut -d' ' -f1)
  gzip -1 -c "$out.tar" >"$out.gz"
  rm "$out.tar"
  digest=$(sha256sum "$out.gz" | cut -d' ' -f1)
  size=$(stat -c %s "$out.gz")
  mv "$out.gz" "$(dirname "$out")/$digest"
  echo "$digest $size $diff_id"
}

# A JSON blob $2 in blob directory $1; prints "digest size".
oci_put_json() {
  local d
  d=$(printf '%s' "$2" | sha256sum | cut -d' ' -f1)
  printf '%s' "$2" >"$1/$d"
  echo "$d $(printf '%s' "$2" | wc -c)"
}

# Writes the OCI layout $1 (tagged `bench`) of the image whose blob directory is
# $1/blobs/sha256, with command $2 (a JSON array) and layers given as
# "digest size diff_id" lines on stdin.
oci_finish_layout() {
  local dir=$1 cmd=$2 blobs=$1/blobs/sha256 layers="" diff_ids="" d s i
  while read -r d s i; do
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$s}"
    diff_ids+="${diff_ids:+,}\"sha256:$i\""
  done
  local config='{"architecture":"amd64","os":"linux","config":{"Cmd":'$cmd',"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":['$diff_ids']}}'
  local dc sc dm sm
  read -r dc sc < <(oci_put_json "$blobs" "$config")
  local manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'$dc'","size":'$sc'},"layers":['$layers']}'
  read -r dm sm < <(oci_put_json "$blobs" "$manifest")
  printf '%s' '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'$dm'","size":'$sm',"annotations":{"org.opencontainers.image.ref.name":"bench"}}]}' >"$dir/index.json"
  printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts docker-registry on storage $1, listening on $2 (host:port), its log (with
# the access log: each response's size) in $3, optionally under the command prefix in
# $4 (e.g. `ip netns exec NS`); waits until it answers; sets REGISTRY_PID.
start_registry() {
  local storage=$1 addr=$2 log=$3 prefix=${4:-}
  local config="$log.yml"
  cat >"$config" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $storage
http:
  addr: $addr
YML
  $prefix docker-registry serve "$config" >"$log" 2>&1 &
  REGISTRY_PID=$!
  local host=${addr%:*} port=${addr##*:}
  for _ in $(seq 100); do
    $prefix bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "start_registry: docker-registry did not answer on $addr: $(tail -3 "$log")" >&2
  return 1
}
