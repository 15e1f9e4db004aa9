#!/usr/bin/env bash
# npm run demo: a tour of addcow-mount in one minute, in a temp dir that is
# removed at the end. Needs root (FUSE, loop devices) and `bash .ci/setup`.
#   1. a 64 MiB base disk: an MBR partition table with an ext4 partition
#   2. an add-cow overlay on it, mounted: the file equals the base disk
#   3. the partition inside the mounted file mounted through a loop device,
#      a file added, everything unmounted, e2fsck clean
#   4. the base disk is byte-for-byte unchanged; the overlay holds the change
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if [ ! -f "$REPO/dist/src/cli/addcow-mount.js" ]; then
  echo "demo: build first (bash .ci/setup, or npm run build)" >&2
  exit 1
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-demo.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"
echo "demo directory: $work"

say "1. a base disk: 64 MiB, MBR, one ext4 partition holding hello.txt (built without mounting)"
mkdir content && echo "I live on the base disk" > content/hello.txt
run truncate -s 64M base.raw
printf 'label: dos\nstart=2048, type=83\n' | run sfdisk --quiet base.raw
run mkfs.ext4 -q -F -E offset=$((2048 * 512)) -d content base.raw 63M
base_sum=$(sha256sum < base.raw)

say "2. an add-cow overlay on it, and the mount"
run addcow create -b base.raw -F raw disk.add-cow
run addcow-mount disk.add-cow mnt
cleanup_push fusermount -u "$work/mnt"
run ls -l mnt
run cmp mnt/disk base.raw
echo "mnt/disk is the virtual disk, identical to base.raw"

if loop=$(loop_with_partitions mnt/disk 2>/dev/null); then
  cleanup_push losetup -d "$loop"
  say "3. the partition inside the mounted file, through a loop device ($loop)"
  mkdir fs
  run mount "${loop}p1" fs
  cleanup_push umount -l "$work/fs"
  run cat fs/hello.txt
  echo "written through the overlay" > fs/new.txt
  run ls -l fs
  run umount fs
  echo "\$ e2fsck -fn ${loop}p1"
  e2fsck -fn "${loop}p1" >/dev/null 2>&1
  echo "e2fsck: clean"
  run losetup -d "$loop"
else
  say "3. (no loop devices here: writing with dd instead)"
  run dd if=/dev/urandom of=mnt/disk bs=4k seek=100 count=8 conv=notrunc,fsync status=none
fi

say "4. unmount; the base disk is unchanged, the overlay holds the change"
umount_disk mnt
if [ "$(sha256sum < base.raw)" = "$base_sum" ]; then echo "base.raw: unchanged"; else echo "base.raw CHANGED" >&2; exit 1; fi
run du -h disk.raw
echo "disk.raw holds only the clusters that were written ($(du -k disk.raw | cut -f1) KiB of 64 MiB)"
if addcow --help | grep -qE "^  info\b"; then run addcow info disk.add-cow; fi

say "remount read-only: the change is still there"
run addcow-mount -o ro disk.add-cow mnt
if cmp -s mnt/disk base.raw; then echo "no change seen" >&2; exit 1; fi
echo "mnt/disk differs from base.raw: the overlay's writes persisted"
umount_disk mnt
say "demo finished; cleaning up $work"
