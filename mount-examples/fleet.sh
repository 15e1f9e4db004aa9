#!/usr/bin/env bash
# A fleet on one golden image served over HTTP: the base lives on a web
# server (here a local nginx this script starts on a free port), every VM gets
# a small local overlay, and the hosts fetch only the blocks their guests
# read, once, into a block cache that every overlay on the host shares.
#
#   vm1, vm2: mounted together; vm2 boots from the cache vm1 filled
#   vm3:      mounted with -o copy-on-read, then streamed live into a
#             standalone raw disk that needs neither the server nor the overlay
#
# The same works with s3://bucket/key bases (AWS credentials from the usual
# environment variables or profiles; ADDCOW_S3_ENDPOINT for S3-compatible
# stores): see docs/remote.md. Needs root (nginx, loop mounts) and FUSE.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-fleet.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"

say "a golden image: an ext4 file system with one file, served by nginx"
mkdir -p www rootfs/etc
echo golden > rootfs/etc/hostname
run mkfs.ext4 -q -F -d rootfs www/base.raw 64M
port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
mkdir -p nginx/tmp
cat > nginx/nginx.conf <<CONF
daemon off; master_process off; pid $work/nginx/nginx.pid; error_log $work/nginx/error.log;
events {}
http {
  access_log $work/nginx/access.log;
  client_body_temp_path $work/nginx/tmp/b; proxy_temp_path $work/nginx/tmp/p;
  fastcgi_temp_path $work/nginx/tmp/f; uwsgi_temp_path $work/nginx/tmp/u; scgi_temp_path $work/nginx/tmp/s;
  server { listen 127.0.0.1:$port; root $work/www; }
}
CONF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
nginx_pid=$!
cleanup_push kill "$nginx_pid"
for i in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/base.raw"
requests() { grep -c 'GET /base.raw' "$work/nginx/access.log" || true; }
# The count once readahead still in flight has landed.
settled_requests() {
  local a b
  b=$(requests)
  while sleep 0.5; a=$b; b=$(requests); [ "$a" != "$b" ]; do :; done
  echo "$b"
}

# The shared block cache; by default /var/cache/addcow (root) or ~/.cache/addcow.
export ADDCOW_CACHE_DIR="$work/cache"

say "three overlays over the URL (each 1 GiB: room to grow past the 64 MiB base)"
for vm in vm1 vm2 vm3; do run addcow create -q -b "$url" -F raw $vm.add-cow 1G; done
run addcow info vm1.add-cow | grep -E "^(backing|remote)"

say "mount vm1 and vm2 in one daemon, vm3 alone with copy-on-read"
run addcow-mount vm1.add-cow vm2.add-cow mnt
cleanup_push fusermount -u "$work/mnt"
run addcow-mount -o copy-on-read vm3.add-cow mnt3
cleanup_push fusermount -u "$work/mnt3"
ls -l mnt mnt3

# "boot": check the file system and read its files through a loop mount, then write.
boot() {
  local disk=$1 name=$2 dir="$work/root-$2"
  mkdir -p "$dir"
  e2fsck -fn "$disk" >/dev/null
  mount -o loop "$disk" "$dir"
  cleanup_push umount "$dir"
  echo "$name: hostname was $(cat "$dir/etc/hostname")"
  echo "$name" > "$dir/etc/hostname"
  umount "$dir"
}
before=$(settled_requests)
boot mnt/vm1 vm1
after_vm1=$(settled_requests)
echo "vm1 boot: $((after_vm1 - before)) requests to the server"
boot mnt/vm2 vm2
after_vm2=$(settled_requests)
echo "vm2 boot: $((after_vm2 - after_vm1)) requests to the server (vm1 filled the shared cache)"
boot mnt3/vm3 vm3

say "stream vm3 (live, while mounted): its image file becomes a standalone raw disk"
run addcow stream vm3.add-cow
umount_disk mnt3
run addcow info vm3.add-cow | grep -E "allocated|features"

say "every VM kept its own writes; the base on the server is unchanged"
umount_disk mnt
for vm in vm1 vm2; do
  addcow-mount -o ro $vm.add-cow "ro-$vm"
  echo "$vm: $(debugfs -R 'cat /etc/hostname' "ro-$vm/$vm" 2>/dev/null)"
  umount_disk "ro-$vm"
done
echo "base: $(debugfs -R 'cat /etc/hostname' www/base.raw 2>/dev/null)"

say "vm3.raw needs neither the server nor the overlay any more"
kill "$nginx_pid"; wait "$nginx_pid" 2>/dev/null || true
run rm vm3.add-cow
run e2fsck -fn vm3.raw
echo "vm3.raw: $(debugfs -R 'cat /etc/hostname' vm3.raw 2>/dev/null) (standalone)"
