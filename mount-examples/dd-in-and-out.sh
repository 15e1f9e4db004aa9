#!/usr/bin/env bash
# dd in and out of a mounted add-cow disk: the mounted file is the whole
# virtual disk, so dd, cmp, cp and friends work on it as on a raw image.
# Needs root (FUSE). Everything lives in a temp dir that is removed at the end.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-example.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"

say "a 32 MiB raw base disk with some data, and an overlay on top of it"
run dd if=/dev/urandom of=base.raw bs=1M count=32 status=none
run addcow create -b base.raw -F raw disk.add-cow

say "mount it: mnt/disk is the virtual disk (the command returns once it is ready)"
run addcow-mount disk.add-cow mnt
cleanup_push fusermount -u "$work/mnt"
run ls -l mnt

say "dd out: the whole disk, identical to the base before any write"
run dd if=mnt/disk of=out.raw bs=1M status=none
run cmp out.raw base.raw
echo "identical"

say "dd in: 4 MiB of zeros at 1 MiB. conv=notrunc as for any image file (a size change is refused)"
run dd if=/dev/zero of=mnt/disk bs=1M seek=1 count=4 conv=notrunc,fsync status=none

say "the disk changed, the base did not; the new data sits in the image file disk.raw"
run cmp -s mnt/disk base.raw || echo "mnt/disk differs from base.raw (as it should)"
echo '$ dd if=mnt/disk bs=1M skip=1 count=4 | cmp - <(head -c 4M /dev/zero)'
dd if=mnt/disk bs=1M skip=1 count=4 status=none | cmp - <(head -c 4M /dev/zero)
echo "the 4 MiB of zeros are there"
run du -h --apparent-size disk.raw
run du -h disk.raw

say "unmount: flushes and stops the daemon"
umount_disk mnt
