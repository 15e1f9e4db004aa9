#!/usr/bin/env bash
# Attaching a mounted add-cow disk to a QEMU virtual machine: the mounted file
# is a raw disk image, so QEMU takes it with format=raw. The VM's writes go to
# the overlay; the base image stays untouched and can be shared by many VMs.
#
#   addcow create -b debian-12.raw -F raw vm1.add-cow
#   addcow-mount vm1.add-cow /srv/vm1
#   qemu-system-x86_64 -enable-kvm -m 2G -cpu host \
#     -drive file=/srv/vm1/vm1,format=raw,if=virtio,cache=none,aio=threads,discard=ignore \
#     -nic user,model=virtio-net-pci
#
# cache=none opens the file with O_DIRECT (supported) and leaves caching to the
# guest; every guest flush becomes an fsync of the file, which makes the add-cow
# bitmap durable. aio=threads, not io_uring/native: the file is on FUSE.
#
# This script builds a small overlay, mounts it and shows the command line;
# it boots nothing unless BOOT=1 and qemu-system-x86_64 is installed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-example.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"

say "a 64 MiB base image and a per-VM overlay"
run truncate -s 64M base.raw
run addcow create -q -b base.raw -F raw vm1.add-cow
run addcow-mount vm1.add-cow vm1
cleanup_push fusermount -u "$work/vm1"

say "what QEMU sees: a raw image of the virtual size"
run qemu-img info -f raw vm1/vm1

cmd=(qemu-system-x86_64 -m 512M -nographic
  -drive "file=$work/vm1/vm1,format=raw,if=virtio,cache=none,aio=threads"
  -nic none)
say "the command line (a live VM would also get -enable-kvm and a network)"
echo "${cmd[*]}"
if [ "${BOOT:-0}" = 1 ] && command -v qemu-system-x86_64 >/dev/null; then
  "${cmd[@]}"
fi

say "stop the VM before unmounting; the unmount flushes the overlay"
umount_disk vm1
