# Shared by the example scripts: find the addcow programs and clean up on exit.
# The examples run the addcow they came with: dist/ beside them (a checkout
# after `bash .ci/setup`, or the installed package); else the one on PATH.
# A checkout's runs on the checkout's Node.js, as its npm scripts do
# (node_modules/.bin/node, linked by npm ci to what .ci/install-node installed).
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NODE=node
if [ -x "$REPO/node_modules/.bin/node" ]; then NODE=$REPO/node_modules/.bin/node; fi

addcow() {
  if [ -f "$REPO/dist/src/cli/addcow.js" ]; then "$NODE" "$REPO/dist/src/cli/addcow.js" "$@"; else command addcow "$@"; fi
}
addcow-mount() {
  if [ -f "$REPO/dist/src/cli/addcow-mount.js" ]; then "$NODE" "$REPO/dist/src/cli/addcow-mount.js" "$@"; else command addcow-mount "$@"; fi
}

# Print each command before running it, like `set -x` but readable.
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# cleanup_push CMD...: run at exit (newest first), even after a failure.
CLEANUP=()
cleanup_push() { CLEANUP+=("$*"); }
cleanup_run() {
  local i
  for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[$i]}" >/dev/null 2>&1 || true; done
  CLEANUP=()
}
trap cleanup_run EXIT

# losetup -P, then partx when the kernel cannot parse partition tables itself.
loop_with_partitions() {
  local dev
  dev=$(losetup --find --show -P "$1")
  if ! ls "/sys/block/${dev#/dev/}" | grep -q "^${dev#/dev/}p"; then partx -a "$dev"; fi
  echo "$dev"
}

# umount_disk DIR: fusermount -u, then wait until the daemon has released the
# disk (it notices the unmount within a fraction of a second), so the next
# command can open the disk again.
umount_disk() {
  local dir i
  dir=$(realpath "$1")
  printf '$ fusermount -u %s\n' "$1"
  fusermount -u "$dir"
  for i in $(seq 100); do
    ps -eo args= | grep -F "addcow-mount" | grep -qF " $dir --daemon-child" || return 0
    sleep 0.1
  done
}
