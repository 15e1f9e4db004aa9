#!/usr/bin/env bash
# A partitioned disk inside a mounted add-cow disk: losetup -P turns the
# mounted file into /dev/loopN with /dev/loopNp1..., which mkfs and mount use
# like any disk. Needs root.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/addcow-example.XXXXXX"); cleanup_push rm -rf "$work"; cd "$work"

say "an empty 64 MiB overlay (no backing file)"
run addcow create disk.add-cow 64M
run addcow-mount disk.add-cow mnt
cleanup_push fusermount -u "$work/mnt"

say "partition it like a real disk (an MBR with one Linux partition)"
printf 'label: dos\nstart=2048, type=83\n' | run sfdisk --quiet mnt/disk

say "a loop device with partitions (partx -a when the kernel does not scan them itself)"
loop=$(loop_with_partitions mnt/disk)
cleanup_push losetup -d "$loop"
echo "$loop"; ls "${loop}"p*

say "ext4 on the first partition, mounted, a file written"
run mkfs.ext4 -q "${loop}p1"
mkdir fs
run mount "${loop}p1" fs
cleanup_push umount -l "$work/fs"
echo "hello from inside the overlay" > fs/hello.txt
run ls -l fs

say "unmount in order: the partition, the loop device, then the add-cow mount"
run umount fs
run e2fsck -fn "${loop}p1"
run losetup -d "$loop"
umount_disk mnt
