#!/usr/bin/env bash
# The whole life of an add-cow overlay: create it over a base image, mount it,
# use it, take a live snapshot, stream the disk into a standalone raw image
# while it stays mounted, then throw the overlay files and the base away.
#
#   bash mount-examples/overlay-lifecycle.sh [WORKDIR]
#
# Needs FUSE (root or a user allowed to use /dev/fuse) and a built tree
# (npm run build), or addcow/addcow-mount on PATH (set ADDCOW/ADDCOW_MOUNT).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# A checkout's own Node.js (npm ci links it there), else the PATH's.
node=node
if [ -x "$here/../node_modules/.bin/node" ]; then node="$here/../node_modules/.bin/node"; fi
ADDCOW=${ADDCOW:-"$node $here/../dist/src/cli/addcow.js"}
ADDCOW_MOUNT=${ADDCOW_MOUNT:-"$node $here/../dist/src/cli/addcow-mount.js"}
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/addcow-lifecycle-XXXXXX")}
mkdir -p "$work"
cd "$work"
mnt="$work/mnt"
cleanup() { if mountpoint -q "$mnt" 2>/dev/null; then fusermount -u "$mnt" || fusermount -uz "$mnt"; fi; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "a base image (64 MiB of data) that stays untouched"
dd if=/dev/urandom of=base.raw bs=1M count=64 status=none
sha_base=$(sha256sum base.raw | cut -d' ' -f1)

step "create: vm.add-cow over base.raw (image file vm.raw)"
$ADDCOW create -b base.raw -F raw vm.add-cow

step "mount: the disk appears as the flat file mnt/vm"
$ADDCOW_MOUNT vm.add-cow "$mnt"
ls -l "$mnt"

step "use: write 8 MiB into the disk (copy-on-write into vm.raw)"
dd if=/dev/urandom of="$mnt/vm" bs=1M count=8 seek=4 conv=notrunc,fsync status=none
ls -ls vm.raw   # sparse: only the written clusters take space

step "snapshot (live): new writes go to snap.add-cow; vm.add-cow is only read from now on"
$ADDCOW snapshot vm.add-cow snap.add-cow
dd if=/dev/urandom of="$mnt/vm" bs=1M count=4 seek=40 conv=notrunc,fsync status=none

step "stream (live): copy everything still read from the chain into snap.raw"
$ADDCOW stream snap.add-cow
$ADDCOW jobs
sha_disk=$(sha256sum "$mnt/vm" | cut -d' ' -f1)

step "unmount"
fusermount -u "$mnt"
# The daemon flushes and lets go of the disk a moment later; addcow waits for it.
$ADDCOW info snap.add-cow | grep -E "allocated"

step "discard: snap.raw is a complete raw disk on its own"
rm snap.add-cow vm.add-cow vm.raw
[ "$(sha256sum base.raw | cut -d' ' -f1)" = "$sha_base" ] && echo "base.raw was never modified"
rm base.raw
[ "$(sha256sum snap.raw | cut -d' ' -f1)" = "$sha_disk" ] && echo "snap.raw holds exactly what the mounted disk showed"
ls -l "$work"
