# Sourced by scripts/aarch64.sh and scripts/swift.sh: the Debian root under ~/.cache that both use, its mounts
# (undone on exit) and `in_ch`, which runs a command inside it with a clean environment.
#   CH_PASS=(VAR ...)   host variables passed into the root when set
#   ch_env() { e+=(VAR=value ...); }   more fixed variables, computed at each call (optional)
ROOT=${ARMPROBE_ROOT:-$HOME/.cache/armprobe}
SUITE=${ARMPROBE_SUITE:-trixie}
CH=$ROOT/$SUITE-root

# chroot needs /proc (qemu, rustc, swift) and /dev (/dev/null and the like).
MOUNTED=()
mnt() {  # mnt SRC DST: SRC bind-mounted (or a proc filesystem for "proc") at DST, once
  mkdir -p "$2"
  mountpoint -q "$2" && return 0
  if [ "$1" = proc ]; then mount -t proc proc "$2"; else mount --bind "$1" "$2"; fi
  MOUNTED+=("$2")
}
cleanup() { local i; for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[i]}" || true; done; }
trap cleanup EXIT
base_mounts() { mnt proc "$CH/proc"; mnt /dev "$CH/dev"; }

# The host's CA bundle is copied into the root at setup: apt and cargo there trust the host's certificates.
CH_PASS=()
in_ch() {
  local e=(HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
    SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt)
  local v
  if declare -F ch_env >/dev/null; then ch_env; fi
  for v in "${CH_PASS[@]}"; do
    if [ -n "${!v:-}" ]; then e+=("$v=${!v}"); fi
  done
  chroot "$CH" /usr/bin/env -i "${e[@]}" "$@"
}
