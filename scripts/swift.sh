#!/usr/bin/env bash
# The Swift bindings tested for real on Linux (issue 33): Debian's Swift toolchain (`swiftlang`, Swift 6.0 with
# Foundation, XCTest and swift-testing) lives in the Debian trixie root that scripts/aarch64.sh makes under
# ~/.cache (Debian 12 has no Swift); the generated EdgepackMobile.swift and mobile/tests/BindingsTest.swift are
# compiled there against the x86_64 library and run there, reaching `edgepack serve` on this host's loopback (a
# chroot shares the network) and the GPU through Mesa's lavapipe in the root.
#
#   scripts/swift.sh setup                              swiftlang + lavapipe in the root (idempotent; ~1 min cold)
#   scripts/swift.sh test BINDINGS_DIR FIXTURES.json    compile and run the checks; exits non-zero on a failure
#
# BINDINGS_DIR is scripts/bindings.sh's output: swift/ (the generated sources, swift/linux/ the module map for
# Linux) and python/libedgepack_mobile.so (the library). Every absolute path the fixtures name is bind-mounted at
# the same path inside the root for the run. Needs root (chroot, mount), as scripts/aarch64.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
log() { printf '[swift %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# shellcheck source=scripts/chroot.sh
. scripts/chroot.sh
CH_PASS=(EDGEPACK_REQUIRE_GPU RUST_BACKTRACE RUST_LOG LD_LIBRARY_PATH)

setup() {
  if [ ! -e "$CH/.armprobe-ok" ]; then
    log "no Debian root at $CH: scripts/aarch64.sh setup makes it"
    ./scripts/aarch64.sh setup
  fi
  base_mounts
  cp -f /etc/ssl/certs/ca-certificates.crt "$CH/etc/ssl/host-ca-bundle.crt"
  if [ ! -x "$CH/usr/bin/swiftc" ] || ! ls "$CH"/usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    log "apt-get install swiftlang mesa-vulkan-drivers libvulkan1 in $CH (~1 min, ~250 MB download)"
    in_ch sh -c "apt-get update -qq && apt-get install -y -qq swiftlang mesa-vulkan-drivers libvulkan1 >/dev/null \
      && apt-get clean" || { echo "FATAL: installing swiftlang in $CH failed" >&2; exit 1; }
  fi
  in_ch swiftc --version 2>&1 | head -1 >&2
}

test_bindings() {
  local bindings fixtures
  [ $# -eq 2 ] || { echo "usage: scripts/swift.sh test BINDINGS_DIR FIXTURES.json" >&2; exit 2; }
  [ -d "$1" ] || { echo "FATAL: no bindings folder $1 (scripts/bindings.sh DIR makes one)" >&2; exit 1; }
  [ -f "$2" ] || { echo "FATAL: no fixtures file $2 (tests/python/test_bindings.py writes one)" >&2; exit 1; }
  bindings=$(cd "${1:?usage: scripts/swift.sh test BINDINGS_DIR FIXTURES.json}" && pwd)
  fixtures=$(cd "$(dirname "${2:?usage: scripts/swift.sh test BINDINGS_DIR FIXTURES.json}")" && pwd)/$(basename "$2")
  for f in swift/EdgepackMobile.swift swift/linux/module.modulemap swift/linux/EdgepackMobileFFI.h \
    python/libedgepack_mobile.so; do
    [ -f "$bindings/$f" ] || { echo "FATAL: $bindings/$f missing (scripts/bindings.sh makes it)" >&2; exit 1; }
  done
  setup
  # The build happens in the root on copies, as an app is built: the generated Swift becomes the EdgepackMobile
  # module (what the XCFramework's Swift package is), which the test and the README's example import.
  local work=/var/tmp/edgepack-swift
  rm -rf "${CH:?}$work" && mkdir -p "$CH$work/ffi"
  cp "$bindings/swift/EdgepackMobile.swift" "$REPO/mobile/tests/BindingsTest.swift" "$CH$work/"
  cp "$bindings/swift/linux/module.modulemap" "$bindings/swift/linux/EdgepackMobileFFI.h" "$CH$work/ffi/"
  cp "$bindings/python/libedgepack_mobile.so" "$CH$work/"
  # The README's Swift example (its first ```swift block), compiled and run too.
  python3 - "$REPO/mobile/README.md" > "$CH$work/main.swift" <<'PY'
import re, sys
blocks = re.findall(r"```swift\n(.*?)```", open(sys.argv[1]).read(), re.S)
assert blocks, "no ```swift block in mobile/README.md"
print(blocks[0], end="")
PY
  log "swiftc: the EdgepackMobile module, BindingsTest.swift and the README's example"
  in_ch sh -c "cd $work && swiftc -O -parse-as-library -emit-library -emit-module -module-name EdgepackMobile \
      -I ffi -L . -ledgepack_mobile EdgepackMobile.swift -o libEdgepackMobile.so \
    && swiftc -O -parse-as-library -I . -I ffi -L . -lEdgepackMobile -ledgepack_mobile BindingsTest.swift \
      -o bindings-test \
    && swiftc -I . -I ffi -L . -lEdgepackMobile -ledgepack_mobile main.swift -o readme-example" \
    || { echo "FATAL: the Swift bindings, BindingsTest.swift or the README's example do not compile" >&2; exit 1; }
  # Every file the fixtures name, at the same path inside the root.
  mapfile -t dirs < <(python3 - "$fixtures" <<'PY'
import json, os, sys
seen = set()
def walk(v):
    if isinstance(v, dict):
        for x in v.values(): walk(x)
    elif isinstance(v, list):
        for x in v: walk(x)
    elif isinstance(v, str) and v.startswith("/") and os.path.exists(v):
        seen.add(v if os.path.isdir(v) else os.path.dirname(v))
walk(json.load(open(sys.argv[1])))
print("\n".join(sorted(seen)))
PY
)
  dirs+=("$(dirname "$fixtures")")
  local d
  for d in "${dirs[@]}"; do
    case "$d" in /|/proc*|/dev*|/sys*) echo "FATAL: will not mount $d into the root" >&2; exit 1 ;; esac
    mnt "$d" "$CH$d"
  done
  log "running the checks in $CH"
  local rc=0
  LD_LIBRARY_PATH=$work in_ch "$work/bindings-test" "$fixtures" || rc=$?
  mapfile -t args < <(python3 -c 'import json, sys; f = json.load(open(sys.argv[1]))
print(f["effnet"]); print(f["photos"]["chelsea"]); print(f["serve"])' "$fixtures")
  echo "==> the README example: readme-example ${args[*]}"
  LD_LIBRARY_PATH=$work in_ch "$work/readme-example" "${args[@]}" || { echo "README example failed: exit $?"; rc=1; }
  return $rc
}

case "${1:-}" in
  setup) setup ;;
  test) shift; test_bindings "$@" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
