#!/usr/bin/env bash
# Discarding the overlay once the image is complete. While a disk is mounted,
# `addcow stream` copies every cluster still read from the backing file into
# the image file and sets the "all allocated" bit; from then on the image file
# alone is the disk: a plain raw image that needs neither the backing file nor
# the .add-cow file.
#
# On a mounted disk `addcow stream` runs as a live job inside the mount daemon
# (through its control socket) while the disk stays in use; on an unmounted
# disk it runs in the addcow process itself. An addcow without `stream` makes
# this script stop after showing the command.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-example.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"

say "a base disk, an overlay, mounted and written to"
run dd if=/dev/urandom of=base.raw bs=1M count=16 status=none
run addcow create -q -b base.raw -F raw disk.add-cow
run addcow-mount disk.add-cow mnt
cleanup_push fusermount -u "$work/mnt"
run dd if=/dev/zero of=mnt/disk bs=64k count=4 seek=3 conv=notrunc status=none

say "copy everything still in the backing file into the image file (live, while mounted)"
if ! addcow --help | grep -qE "^  stream\b"; then
  echo "addcow stream disk.add-cow    # not in this version of addcow"
  exit 0
fi
run addcow stream disk.add-cow

say "unmount; the image file disk.raw is now the complete disk"
umount_disk mnt
run addcow info disk.add-cow || true
cp base.raw expected.raw
dd if=/dev/zero of=expected.raw bs=64k count=4 seek=3 conv=notrunc status=none
run cmp disk.raw expected.raw
echo "disk.raw stands alone: the overlay and the backing file can go"
run rm disk.add-cow base.raw
