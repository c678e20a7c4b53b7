#!/usr/bin/env bash
# edgepack on aarch64 (issue 27). Adapted from shared/tools/aarch64.sh.
#   aarch64.sh test                    # setup, the kernels' property tests under qemu on -cpu max (i8mm),
#                                      # a Cortex-A76 (dotprod) and a Cortex-A53 (plain NEON), clippy, then
#                                      # `models` and `bindings`; what the test command (CI) runs
#   aarch64.sh bindings                # the aarch64 phone library + an aarch64 Python, for the bindings test
#   aarch64.sh models                  # every shared model on aarch64 (tract + kernels, interpreter) against
#                                      # onnxruntime's outputs from this host (needs $EDGEPACK_BIN, $PY)
#   aarch64.sh count-models            # instructions per inference table (BENCHMARKS.md), after `test`
#   aarch64.sh size                    # the stripped aarch64 mobile library sizes (small build, tract build)
#   aarch64.sh all                     # test + size (`just aarch64`)
#
# aarch64 toolchain recipe (verified 2026-12-04 on this project's Debian 12 x86-64 machines, 2 cores, as root):
# cross-build + test Rust for aarch64-unknown-linux-gnu without rustup targets, run it under
# qemu-user, and count guest instructions deterministically with a TCG plugin.
#
#   ROOT (cacheable, ~1.8 GB): $ARMPROBE_ROOT, default ~/.cache/armprobe
#   SUITE: $ARMPROBE_SUITE = trixie (stable + trixie-backports rustc, default) | sid
#
#   aarch64.sh setup                   # chroot + toolchain + plugin (idempotent; 70-130 s cold)
#   aarch64.sh cargo DIR ARGS...       # cargo in the chroot on project DIR (bind-mounted at /src)
#        e.g. cargo DIR test --locked --release --target aarch64-unknown-linux-gnu
#        binaries land in $ROOT/$SUITE-root/var/cache/armprobe-target/aarch64-unknown-linux-gnu/...
#   aarch64.sh run BIN ARGS...         # run an aarch64 binary (host path) under the chroot's qemu
#   aarch64.sh count BIN ARGS...       # print "insns: N" (host bookworm qemu 7.2 + plugin)
#   aarch64.sh selftest                # build/test/count the embedded NEON probe crate
#   aarch64.sh shell                   # interactive shell in the chroot
#   aarch64.sh ort-setup               # + arm64 python3.13 root with onnxruntime/numpy wheels
#   aarch64.sh count-py SCRIPT ARGS... # "insns: N" for an arm64 python run (ORT under qemu 7.2)
set -euo pipefail

MIRROR=${ARMPROBE_MIRROR:-http://deb.debian.org/debian}
TRIPLE=aarch64-unknown-linux-gnu
QEMU_CPU=${ARMPROBE_CPU:-max}          # e.g. cortex-a53 (no dotprod), cortex-a76 (dotprod, no i8mm)
log() { printf '[armprobe %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---- the root's mounts and `in_ch` (shared with scripts/swift.sh) ------------------------------------
# shellcheck source=scripts/chroot.sh
. "$(dirname "$0")/chroot.sh"
ch_env() {  # cargo's cross-build environment; QEMU_CPU is read at each call (`test` changes it per CPU)
    e+=(CARGO_HTTP_CAINFO=/etc/ssl/host-ca-bundle.crt
        CARGO_TARGET_DIR=/var/cache/armprobe-target CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $QEMU_CPU -L /usr/aarch64-linux-gnu")
}
CH_PASS=(RUSTC_BOOTSTRAP RUSTFLAGS CARGO_INCREMENTAL CARGO_TERM_COLOR RUST_BACKTRACE EDGEPACK_CPU EDGEPACK_KERNELS
    EDGEPACK_ISA EDGEPACK_EXPECT_ISA MODEL_CHECK_PROFILE)

setup() {
    local t0=$SECONDS
    # host side: debootstrap, dynamic qemu-user 7.2 (the only Debian qemu-user that can load plugins), gcc
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
    command -v gcc >/dev/null || need+=(gcc libc6-dev)
    if [ ${#need[@]} -gt 0 ]; then
        log "host apt-get install ${need[*]}"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    mkdir -p "$ROOT"
    if [ ! -e "$CH/.armprobe-ok" ]; then
        rm -rf "$CH"
        log "debootstrap --variant=minbase $SUITE (~1.5 min)"
        debootstrap --variant=minbase "$SUITE" "$CH" "$MIRROR" > "$ROOT/debootstrap-$SUITE.log" 2>&1 \
            || { tail -20 "$ROOT/debootstrap-$SUITE.log"; exit 1; }
        # the mirror here serves Release files past their Valid-Until: apt refuses them without this
        echo 'Acquire::Check-Valid-Until "false";' > "$CH/etc/apt/apt.conf.d/99armprobe"
        echo 'APT::Install-Recommends "false";' >> "$CH/etc/apt/apt.conf.d/99armprobe"
        local T=""
        if [ "$SUITE" = trixie ]; then
            echo "deb $MIRROR trixie-backports main" > "$CH/etc/apt/sources.list.d/backports.list"
            T="-t trixie-backports"
        fi
        base_mounts
        in_ch sh -c "dpkg --add-architecture arm64 && apt-get update -qq"
        # The host compiler and the arm64 standard library must be one version (libstd-rust-dev Breaks any
        # other). A mirror publishes a new rustc for amd64 before arm64's build lands (seen 2026-12-05: amd64
        # 1.98.1, arm64 1.97.1 in trixie-backports): then the amd64 packages of the arm64 version come from the
        # pool, where superseded versions stay for a while.
        local V A ver
        V=$(in_ch apt-cache $T policy libstd-rust-dev:arm64 | awk '/Candidate:/{print $2}')
        A=$(in_ch apt-cache $T policy libstd-rust-dev:amd64 | awk '/Candidate:/{print $2}')
        [ -n "$V" ] && [ "$V" != "(none)" ] || { echo "FATAL: no libstd-rust-dev:arm64 in $SUITE" >&2; exit 1; }
        local pkgs=(rustc cargo libstd-rust-dev rust-clippy)
        if [ "$V" != "$A" ]; then
            ver=$(echo "$V" | cut -d. -f1-2)
            log "the mirror's amd64 Rust ($A) is ahead of its arm64 std ($V): amd64 $V from the pool"
            rm -rf "$CH/tmp/rustdebs" && mkdir -p "$CH/tmp/rustdebs"
            pkgs=()
            for p in rustc cargo libstd-rust-dev "libstd-rust-$ver" rust-clippy; do
                curl -fsS -o "$CH/tmp/rustdebs/${p}_${V}_amd64.deb" "$MIRROR/pool/main/r/rustc/${p}_${V}_amd64.deb" \
                    || { echo "FATAL: ${p} $V (amd64) is neither in the index nor in the pool of $MIRROR" >&2; exit 1; }
                pkgs+=("/tmp/rustdebs/${p}_${V}_amd64.deb")
            done
        else
            pkgs=("rustc=$V" cargo "libstd-rust-dev=$V" "rust-clippy=$V")
        fi
        log "apt-get install rustc $V, cargo, clippy, libstd-rust-dev:arm64, cross gcc (~1 min, ~330 MB download)"
        in_ch sh -c "apt-get install -y -qq $T ${pkgs[*]} libstd-rust-dev:arm64=$V \
                gcc-aarch64-linux-gnu libc6-dev-arm64-cross ca-certificates >/dev/null && rm -rf /tmp/rustdebs && \
            cd /tmp && apt-get download -qq qemu-user $T && \
            dpkg-deb --fsys-tarfile qemu-user_*.deb | tar -x -C / ./usr/bin/qemu-aarch64 && \
            rm -f qemu-user_*.deb && apt-get clean"
        mkdir -p "$CH/root/.cargo" "$CH/src" "$CH/var/cache/armprobe-target"
        cat > "$CH/root/.cargo/config.toml" <<'TOML'
[target.aarch64-unknown-linux-gnu]
linker = "aarch64-linux-gnu-gcc"
runner = ["qemu-aarch64", "-cpu", "max", "-L", "/usr/aarch64-linux-gnu"]
TOML
        touch "$CH/.armprobe-ok"
    fi
    cp -f /etc/ssl/certs/ca-certificates.crt "$CH/etc/ssl/host-ca-bundle.crt"
    build_plugin
    base_mounts
    # clippy for the aarch64 code (the kernels' NEON modules are compiled on aarch64 only)
    if ! in_ch cargo clippy --version >/dev/null 2>&1; then
        log "apt-get install rust-clippy"
        in_ch sh -c "apt-get update -qq && apt-get install -y -qq $([ "$SUITE" = trixie ] && echo -t trixie-backports) \
            rust-clippy >/dev/null && apt-get clean"
    fi
    # qemu 7.2 (used by `count`) shows the guest the host's x86 /proc/cpuinfo; code that parses it
    # (tract's fp16 probe, ORT's cpuinfo) then misdetects or crashes. qemu looks a path up under its
    # -L prefix first, so store the aarch64 cpuinfo that qemu 11 emulates at <sysroot>/proc/cpuinfo.
    # (It lists qemu 11's -cpu max features, a superset of 7.2's: HWCAP-based detection is exact.)
    if [ ! -s "$CH/usr/aarch64-linux-gnu/proc/cpuinfo" ]; then
        in_ch sh -c 'printf "%s\n" "#include <stdio.h>" "int main(void){FILE*f=fopen(\"/proc/cpuinfo\",\"r\");int c;if(!f)return 1;while((c=getc(f))!=EOF)putchar(c);return 0;}" > /tmp/cpuinfo.c &&
            aarch64-linux-gnu-gcc -O -o /tmp/cpuinfo /tmp/cpuinfo.c &&
            qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu /tmp/cpuinfo > /tmp/cpuinfo.txt &&
            mkdir -p /usr/aarch64-linux-gnu/proc && mv /tmp/cpuinfo.txt /usr/aarch64-linux-gnu/proc/cpuinfo &&
            rm -f /tmp/cpuinfo /tmp/cpuinfo.c'
    fi
    in_ch sh -c 'rustc --version; cargo --version; aarch64-linux-gnu-gcc --version | head -1; qemu-aarch64 --version | head -1' >&2
    log "setup done in $((SECONDS - t0)) s; $(du -shx "$CH" | cut -f1) in $CH"
}

build_plugin() {
    [ -e "$ROOT/libinsncount.so" ] && [ "$ROOT/libinsncount.so" -nt "$0" ] && return 0
    cat > "$ROOT/insncount.c" <<'C'
/* Minimal QEMU TCG plugin: counts guest instructions executed (user mode).
 * Declares only the few plugin-API v1 entry points it uses, as Debian 12's qemu-user 7.2
 * offers them (no qemu-plugin.h is packaged; QEMU 9+ reworked the inline-op API).
 * Usage: qemu-aarch64 -plugin ./libinsncount.so[,mode=insn][,out=FILE] [-d plugin] prog
 *   default: per-TB inline add (fast; may over-count when a TB exits early, e.g. at a
 *   faulting insn); mode=insn: per-instruction inline add (exact, slower).
 *   The total goes to FILE (or $INSNCOUNT_OUT) and, with -d plugin, to stderr.
 *   One shared counter, not atomic: exact only for single-threaded guests. */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t, struct qemu_plugin_tb *);
typedef void (*udata_cb_t)(qemu_plugin_id_t, void *);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t, tb_trans_cb_t);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *, enum qemu_plugin_op, void *, uint64_t);
void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *, enum qemu_plugin_op, void *, uint64_t);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *, size_t);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t, udata_cb_t, void *);
void qemu_plugin_outs(const char *);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t insns;
static int per_insn;
static const char *outfile;

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (per_insn) {
        for (size_t i = 0; i < n; i++)
            qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i),
                                                       QEMU_PLUGIN_INLINE_ADD_U64, &insns, 1);
    } else {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, n);
    }
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    char buf[64];
    snprintf(buf, sizeof buf, "insns: %llu\n", (unsigned long long)insns);
    if (outfile) {
        FILE *f = fopen(outfile, "w");
        if (f) { fputs(buf, f); fclose(f); }
    }
    qemu_plugin_outs(buf);   /* printed to stderr with -d plugin */
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "insn") || !strcmp(argv[i], "mode=insn")) per_insn = 1;
        else if (!strncmp(argv[i], "out=", 4)) outfile = argv[i] + 4;
    }
    if (!outfile) outfile = getenv("INSNCOUNT_OUT");
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
C
    gcc -O2 -shared -fPIC -fvisibility=hidden -o "$ROOT/libinsncount.so" "$ROOT/insncount.c"
}

# qemu-user 7.2 on the host (dynamic, plugin-capable). -cpu max has NEON/dotprod/i8mm/fp16/bf16/SVE2.
# env -i: the guest's environment is part of what ld.so/libc execute, so fix it for reproducible counts.
count() {
    local bin=$1; shift
    local out; out=$(mktemp)
    local keep=() v
    for v in EDGEPACK_CPU EDGEPACK_KERNELS EDGEPACK_ISA; do
        if [ -n "${!v:-}" ]; then keep+=("$v=${!v}"); fi
    done
    env -i "${keep[@]}" /usr/bin/qemu-aarch64 -cpu "$QEMU_CPU" -L "$CH/usr/aarch64-linux-gnu" \
        -plugin "$ROOT/libinsncount.so,out=$out${ARMPROBE_EXACT:+,mode=insn}" "$bin" "$@" >&2
    cat "$out"; rm -f "$out"
}

run() {  # run an aarch64 binary given by its host path, with the chroot's (newer, static) qemu
    local bin; bin=$(realpath "$1"); shift
    case "$bin" in "$CH"/*) ;; *) echo "binary must live under $CH" >&2; exit 2;; esac
    base_mounts
    in_ch qemu-aarch64 -cpu "$QEMU_CPU" -L /usr/aarch64-linux-gnu "${bin#"$CH"}" "$@"
}

# ---- step 4 (optional): onnxruntime's aarch64 wheel under qemu, for edgepack-vs-ORT instruction counts ----
# An arm64 python3.13 root made with `dpkg -x` (no maintainer scripts, so no binfmt needed) + wheels
# fetched by the host's pip for the aarch64 platform. qemu 7.2 (the plugin-capable one) passes the
# host's x86 /proc/cpuinfo through and ORT's cpuinfo then segfaults at import: a file at
# $A/proc/cpuinfo (captured from qemu 11's emulated one) is picked up through qemu's -L prefix.
PYROOT=$ROOT/arm64py
ort_setup() {
    local A=$PYROOT t0=$SECONDS
    [ -e "$A/.armprobe-ok" ] && return 0
    base_mounts
    rm -rf "$A"; mkdir -p "$A/site" "$A/proc" "$ROOT/wheels"
    in_ch sh -c 'rm -rf /tmp/a64 && mkdir -p /tmp/a64 && cd /tmp/a64 &&
        apt-get install -y -qq --download-only python3.13:arm64 >/dev/null &&
        mv /var/cache/apt/archives/*.deb . &&
        apt-get download -qq $(dpkg-query -W -f="\${Package}:\${Architecture}\n" | grep ":arm64$" |
            grep -v -E "^(libstd-rust|libllvm|libz3|libxml2|libedit)") 2>/dev/null'
    local d; for d in "$CH"/tmp/a64/*.deb; do dpkg -x "$d" "$A"; done
    rm -rf "$CH/tmp/a64"
    ln -sfn usr/lib "$A/lib"; ln -sfn usr/bin "$A/bin"
    cp "$CH/usr/aarch64-linux-gnu/proc/cpuinfo" "$A/proc/cpuinfo"
    pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
        --platform manylinux2014_aarch64 --python-version 3.13 --implementation cp \
        -d "$ROOT/wheels" "onnxruntime${ORT_VERSION:+==$ORT_VERSION}" numpy flatbuffers packaging protobuf
    (cd "$A/site" && for w in "$ROOT"/wheels/*.whl; do unzip -q -o "$w"; done)
    # warm-up: the first import writes __pycache__ (~1.6e9 extra guest instructions); do it once here
    env -i PYTHONPATH="$A/site" "$CH/usr/bin/qemu-aarch64" -cpu max -L "$A" "$A/usr/bin/python3.13" \
        -c "import onnxruntime, numpy; print('onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)" >&2
    touch "$A/.armprobe-ok"
    log "arm64 python + onnxruntime root in $((SECONDS - t0)) s, $(du -sh "$A" | cut -f1)"
}
# count_py SCRIPT ARGS...: instruction count of an arm64 python3.13 run (host qemu 7.2 + plugin).
# Thread pools and hash seeds are pinned; counts still drift ~0.03% run to run (python/ORT startup),
# so take per-inference numbers as (count(N+k) - count(N)) / k.
count_py() {
    local out; out=$(mktemp)
    env -i PYTHONHASHSEED=0 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH="$PYROOT/site" \
        /usr/bin/qemu-aarch64 -cpu "$QEMU_CPU" -L "$PYROOT" \
        -plugin "$ROOT/libinsncount.so,out=$out${ARMPROBE_EXACT:+,mode=insn}" \
        "$PYROOT/usr/bin/python3.13" "$@" >&2
    cat "$out"; rm -f "$out"
}

cargo_in() {  # cargo_in DIR ARGS...
    local dir; dir=$(realpath "$1"); shift
    base_mounts
    mnt "$dir" "$CH/src"
    in_ch sh -c 'cd /src && exec cargo "$@"' cargo "$@"
}

selftest() {
    local P=$ROOT/probe-src
    mkdir -p "$P/src"
    cat > "$P/Cargo.toml" <<'TOML'
[package]
name = "probe"
version = "0.1.0"
edition = "2024"
rust-version = "1.91"

[features]
unstable-intrinsics = []   # vdotq_s32 / vmmlaq_s32 are still unstable in 1.97: needs RUSTC_BOOTSTRAP=1

[dependencies]
half = "2"

[profile.release]
debug = false
TOML
    cat > "$P/src/lib.rs" <<'RS'
//! aarch64 NEON probe: dotprod (SDOT) and i8mm (SMMLA) vs scalar.
#![cfg_attr(feature = "unstable-intrinsics", feature(stdarch_neon_dotprod, stdarch_neon_i8mm))]

/// ```
/// assert_eq!(probe::dot_scalar(&[1, -2, 3], &[4, 5, -6]), 4 - 10 - 18);
/// assert_eq!(std::env::consts::ARCH, "aarch64");
/// ```
pub fn dot_scalar(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// 2x8 * (2x8)^T -> 2x2 (row-major), the SMMLA contract.
pub fn mmla_scalar(a: &[i8; 16], b: &[i8; 16]) -> [i32; 4] {
    let mut c = [0i32; 4];
    for i in 0..2 {
        for j in 0..2 {
            c[i * 2 + j] = (0..8).map(|k| a[i * 8 + k] as i32 * b[j * 8 + k] as i32).sum();
        }
    }
    c
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    use std::arch::aarch64::*;

    /// Plain NEON (no dotprod): widening multiply + pairwise add.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_neon(a: &[i8], b: &[i8]) -> i32 {
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len() % 16, 0);
        let mut acc = vdupq_n_s32(0);
        for i in (0..a.len()).step_by(16) {
            unsafe {
                let va = vld1q_s8(a.as_ptr().add(i));
                let vb = vld1q_s8(b.as_ptr().add(i));
                let lo = vmull_s8(vget_low_s8(va), vget_low_s8(vb));
                let hi = vmull_high_s8(va, vb);
                acc = vpadalq_s16(acc, lo);
                acc = vpadalq_s16(acc, hi);
            }
        }
        vaddvq_s32(acc)
    }

    #[cfg(feature = "unstable-intrinsics")]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_sdot(a: &[i8], b: &[i8]) -> i32 {
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len() % 16, 0);
        let mut acc = vdupq_n_s32(0);
        for i in (0..a.len()).step_by(16) {
            unsafe {
                let va = vld1q_s8(a.as_ptr().add(i));
                let vb = vld1q_s8(b.as_ptr().add(i));
                acc = vdotq_s32(acc, va, vb);
            }
        }
        vaddvq_s32(acc)
    }

    #[cfg(feature = "unstable-intrinsics")]
    #[target_feature(enable = "neon,i8mm")]
    pub unsafe fn mmla_smmla(a: &[i8; 16], b: &[i8; 16]) -> [i32; 4] {
        let mut out = [0i32; 4];
        unsafe {
            let va = vld1q_s8(a.as_ptr());
            let vb = vld1q_s8(b.as_ptr());
            let c = vmmlaq_s32(vdupq_n_s32(0), va, vb);
            vst1q_s32(out.as_mut_ptr(), c);
        }
        out
    }

    /// SMMLA via stable inline asm.
    #[target_feature(enable = "neon,i8mm")]
    pub unsafe fn mmla_smmla_asm(a: &[i8; 16], b: &[i8; 16]) -> [i32; 4] {
        let mut out = [0i32; 4];
        unsafe {
            let va = vld1q_s8(a.as_ptr());
            let vb = vld1q_s8(b.as_ptr());
            let mut c = vdupq_n_s32(0);
            core::arch::asm!("smmla {c:v}.4s, {a:v}.16b, {b:v}.16b",
                c = inout(vreg) c, a = in(vreg) va, b = in(vreg) vb,
                options(pure, nomem, nostack));
            vst1q_s32(out.as_mut_ptr(), c);
        }
        out
    }

    /// Same SDOT via stable inline asm (fallback if the intrinsic is unstable).
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_sdot_asm(a: &[i8], b: &[i8]) -> i32 {
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len() % 16, 0);
        let mut acc = vdupq_n_s32(0);
        for i in (0..a.len()).step_by(16) {
            unsafe {
                let va = vld1q_s8(a.as_ptr().add(i));
                let vb = vld1q_s8(b.as_ptr().add(i));
                core::arch::asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                    acc = inout(vreg) acc, a = in(vreg) va, b = in(vreg) vb,
                    options(pure, nomem, nostack));
            }
        }
        vaddvq_s32(acc)
    }
}

pub fn test_data(n: usize, seed: u32) -> (Vec<i8>, Vec<i8>) {
    let mut s = seed;
    let mut next = || { s = s.wrapping_mul(1664525).wrapping_add(1013904223); (s >> 24) as i8 };
    let a: Vec<i8> = (0..n).map(|_| next()).collect();
    let b: Vec<i8> = (0..n).map(|_| next()).collect();
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_roundtrip() {
        let h = half::f16::from_f32(1.5);
        assert_eq!(h.to_f32(), 1.5);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn sdot_matches_scalar() {
        assert!(std::arch::is_aarch64_feature_detected!("dotprod"), "dotprod not detected");
        let (a, b) = test_data(4096, 7);
        let want = dot_scalar(&a, &b);
        assert_eq!(unsafe { neon::dot_neon(&a, &b) }, want);
        #[cfg(feature = "unstable-intrinsics")]
        assert_eq!(unsafe { neon::dot_sdot(&a, &b) }, want);
        assert_eq!(unsafe { neon::dot_sdot_asm(&a, &b) }, want);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn smmla_matches_scalar() {
        assert!(std::arch::is_aarch64_feature_detected!("i8mm"), "i8mm not detected");
        let (a, b) = test_data(16, 9);
        let a: [i8; 16] = a.try_into().unwrap();
        let b: [i8; 16] = b.try_into().unwrap();
        #[cfg(feature = "unstable-intrinsics")]
        assert_eq!(unsafe { neon::mmla_smmla(&a, &b) }, mmla_scalar(&a, &b));
        assert_eq!(unsafe { neon::mmla_smmla_asm(&a, &b) }, mmla_scalar(&a, &b));
    }
}
RS
    cat > "$P/src/main.rs" <<'RS'
use probe::*;

fn main() {
    let h = half::f16::from_f32(0.333);
    println!("half: {} -> {}", 0.333f32, h.to_f32());
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1 << 16);
    let mode = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    let (a, b) = test_data(n, 42);
    let want = dot_scalar(&a, &b);
    println!("scalar dot = {want}");
    #[cfg(target_arch = "aarch64")]
    {
        let dp = std::arch::is_aarch64_feature_detected!("dotprod");
        let mm = std::arch::is_aarch64_feature_detected!("i8mm");
        println!("fp16={} bf16={}", std::arch::is_aarch64_feature_detected!("fp16"), std::arch::is_aarch64_feature_detected!("bf16"));
        println!("detected: dotprod={dp} i8mm={mm} sve={} sve2={}",
                 std::arch::is_aarch64_feature_detected!("sve"),
                 std::arch::is_aarch64_feature_detected!("sve2"));
        let mut ok = true;
        // run only the requested kernel (for instruction counting)
        let reps = 10;
        if mode == "all" || mode == "neon" {
            let mut r = 0; for _ in 0..reps { r = unsafe { neon::dot_neon(&a, &b) }; }
            println!("neon   dot = {r} {}", if r == want { "OK" } else { ok = false; "MISMATCH" });
        }
        if dp && (mode == "all" || mode == "sdot") {
            #[cfg(feature = "unstable-intrinsics")]
            {
                let r = unsafe { neon::dot_sdot(&a, &b) };
                println!("sdot(intrinsic) = {r} {}", if r == want { "OK" } else { ok = false; "MISMATCH" });
            }
            let mut r = 0; for _ in 0..reps { r = unsafe { neon::dot_sdot_asm(&a, &b) }; }
            println!("sdot(asm)  = {r} {}", if r == want { "OK" } else { ok = false; "MISMATCH" });
        }
        if mm && mode == "all" {
            let (x, y) = test_data(16, 3);
            let x: [i8; 16] = x.try_into().unwrap();
            let y: [i8; 16] = y.try_into().unwrap();
            let w = mmla_scalar(&x, &y);
            #[cfg(feature = "unstable-intrinsics")]
            {
                let r = unsafe { neon::mmla_smmla(&x, &y) };
                println!("smmla(intrinsic) {r:?} {}", if r == w { "OK" } else { ok = false; "MISMATCH" });
            }
            let r = unsafe { neon::mmla_smmla_asm(&x, &y) };
            println!("smmla {r:?} vs scalar {w:?} {}", if r == w { "OK" } else { ok = false; "MISMATCH" });
        }
        if mode == "scalar" {
            let mut r = 0; for _ in 0..reps { r = std::hint::black_box(dot_scalar(std::hint::black_box(&a), &b)); }
            println!("scalar x{reps} = {r}");
        }
        std::process::exit(if ok { 0 } else { 1 });
    }
}
RS
    local t0=$SECONDS
    cargo_in "$P" build --release --target $TRIPLE
    log "first build: $((SECONDS - t0)) s"
    local B=$CH/var/cache/armprobe-target/$TRIPLE/release/probe
    run "$B" 4096
    t0=$SECONDS
    cargo_in "$P" test --release --target $TRIPLE
    log "cargo test via runner: $((SECONDS - t0)) s"
    RUSTC_BOOTSTRAP=1 cargo_in "$P" test --release --features unstable-intrinsics --target $TRIPLE
    RUSTC_BOOTSTRAP=1 cargo_in "$P" build --release --features unstable-intrinsics --target $TRIPLE
    for mode in none scalar neon sdot; do
        echo "count $mode (65536 x10): $(count "$B" 65536 $mode 2>/dev/null) / again: $(count "$B" 65536 $mode 2>/dev/null)"
    done
}

# The project's own checks on aarch64 (see the header).
project_dir() { realpath "$(dirname "$0")/.."; }

# The chroot's target dir serves every checkout (each is mounted at /src): rebuild the workspace's own crates from
# these sources, as scripts/test.sh does for the host build (the dependencies stay cached).
clean_workspace() {
    local dir=$1 crates
    crates=$(cd "$dir" && cargo metadata --no-deps --format-version 1 | python3 -c \
        'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
    # shellcheck disable=SC2086
    cargo_in "$dir" clean --release --target $TRIPLE -q $crates
}

project_test() {
    local dir; dir=$(project_dir)
    local t0=$SECONDS
    clean_workspace "$dir"
    # -cpu max: dotprod and i8mm; Cortex-A76: dotprod only; Cortex-A53: neither (plain NEON). The tests check that
    # the CPU model offers the level named here, so each kernel path provably ran.
    local cpu expect
    for cpu in max:i8mm cortex-a76:dotprod cortex-a53:neon; do
        expect=${cpu#*:} cpu=${cpu%%:*}
        export EDGEPACK_EXPECT_ISA=$expect
        log "edgepack-kernels property tests under qemu -cpu $cpu"
        QEMU_CPU=$cpu  # read by in_ch: the cargo runner's CPU model
        cargo_in "$dir" test --locked --release --target $TRIPLE -p edgepack-kernels
    done
    log "clippy on the aarch64 build of the kernels (warnings are errors)"
    cargo_in "$dir" clippy --locked --release --target $TRIPLE -p edgepack-kernels --all-targets -- -D warnings
    unset EDGEPACK_EXPECT_ISA
    log "kernel tests done in $((SECONDS - t0)) s"
    project_models
    project_bindings
}

# What tests/python/test_bindings.py needs to run the generated Python bindings on aarch64: the phone library (the
# small build: kernel interpreter, no tract, no GPU) for aarch64 and an aarch64 CPython (the `ort-setup` root).
project_bindings() {
    local dir; dir=$(project_dir)
    log "aarch64 libedgepack_mobile.so (kernel interpreter) and an aarch64 Python for the bindings test"
    cargo_in "$dir" build --locked --release --target $TRIPLE -p edgepack-mobile --lib --no-default-features
    ort_setup
}

MODEL_CHECK=/var/cache/armprobe-target/$TRIPLE/release/examples/model_check
CASES=/var/cache/armprobe-cases

# Every shared model (and the INT8 files of EfficientNet-Lite0 and SqueezeNet) on aarch64 under qemu -cpu max, on
# tract (with edgepack's kernels) and on the kernel interpreter, against onnxruntime's outputs computed on this
# host (scripts/arm_cases.py; needs the host's edgepack binary for `quantize`, $EDGEPACK_BIN, and a Python with
# onnxruntime, $PY). Fails when a model does not load or an output is off.
project_models() {
    local dir; dir=$(project_dir)
    local py=${PY:-$HOME/.cache/edgepack-venv/bin/python}
    local bin=${EDGEPACK_BIN:-${CARGO_TARGET_DIR:-$dir/target}/release/edgepack}
    [ -x "$bin" ] || { echo "FATAL: the host edgepack binary is required for the aarch64 model checks ($bin)" >&2; exit 1; }
    if [ -z "${PY:-}" ] && [ ! -x "$py" ]; then
        log "Python environment for the reference outputs ($(dirname "$(dirname "$py")"))"
        python3 -m venv "$(dirname "$(dirname "$py")")"
        "$py" -m pip install -q --disable-pip-version-check -r "$dir/requirements-test.txt"
    fi
    "$py" -c 'import onnxruntime' 2>/dev/null || { echo "FATAL: $py lacks onnxruntime" >&2; exit 1; }
    local t0=$SECONDS
    log "reference cases (onnxruntime on this host) in $CH$CASES"
    "$py" "$dir/scripts/arm_cases.py" "$CH$CASES" --edgepack "$bin" >/dev/null
    log "aarch64 model_check (tract + kernels, interpreter)"
    cargo_in "$dir" build --locked --release --target $TRIPLE -p edgepack-runtime --no-default-features \
        --features tract --example model_check
    local failed=() c be
    for c in "$CH$CASES"/*/case.txt; do
        c=$(basename "$(dirname "$c")")
        for be in tract interp; do
            if ! EDGEPACK_CPU=$be QEMU_CPU=max run "$CH$MODEL_CHECK" "$CASES/$c"; then failed+=("$c on $be"); fi
        done
    done
    log "aarch64 model checks done in $((SECONDS - t0)) s"
    if [ ${#failed[@]} -gt 0 ]; then
        echo "FAILED on aarch64: ${failed[*]}" >&2
        exit 1
    fi
}

project_size() {
    local dir; dir=$(project_dir)
    local rows=()
    for feat in "" tract; do
        local args=(build --locked -q -p edgepack-mobile --lib --profile mobile --no-default-features --target $TRIPLE)
        [ -n "$feat" ] && args+=(--features "$feat")
        log "aarch64 mobile library ${feat:-kernel interpreter} (profile mobile)"
        cargo_in "$dir" "${args[@]}"
        in_ch aarch64-linux-gnu-strip --strip-all -o /tmp/libedgepack_mobile.so \
            /var/cache/armprobe-target/$TRIPLE/mobile/libedgepack_mobile.so
        local bytes; bytes=$(stat -c %s "$CH/tmp/libedgepack_mobile.so")
        rows+=("| aarch64 Linux, ${feat:+with }${feat:-kernel interpreter} | $(awk -v b="$bytes" 'BEGIN{printf "%.2f", b/1048576}') MiB ($bytes B) |")
    done
    printf '%s\n' "| stripped libedgepack_mobile.so (mobile profile, CPU only) | size |" "|---|---|" "${rows[@]}"
}

# Instructions executed per inference (the speed proxy of issue 27) under qemu -cpu max, one thread, as a markdown
# table: EfficientNet-Lite0 and SqueezeNet, fp32 and the INT8 files of `edgepack quantize`, on edgepack's kernels at
# each aarch64 level, the portable kernels, plain tract, the kernel interpreter and onnxruntime's aarch64 wheel.
# Per inference = (count of 3 runs − count of 1 run) / 2, so loading and planning are left out. Needs the reference
# cases and model_check of `project_models` (run `aarch64.sh test` first) and, for onnxruntime, `ort-setup`.
project_count() {
    local dir; dir=$(project_dir)
    QEMU_CPU=max
    local models=(efficientnet_lite0_fp32 efficientnet_lite0_int8 squeezenet1.0_fp32 squeezenet1.0_int8)
    local c
    for c in "${models[@]}"; do
        [ -e "$CH$CASES/$c/case.txt" ] || { echo "FATAL: no reference case $c: run '$0 test' first" >&2; exit 1; }
    done
    [ -x "$CH$MODEL_CHECK" ] || { echo "FATAL: no aarch64 model_check: run '$0 test' first" >&2; exit 1; }
    ort_setup
    local ort_v; ort_v=$(sed -n 's/^Version: //p' "$PYROOT"/site/onnxruntime-*.dist-info/METADATA)
    local configs=(
        "edgepack, tract + ARM kernels (i8mm: usmmla)|EDGEPACK_ISA=i8mm"
        "edgepack, tract + ARM kernels (dotprod: sdot)|EDGEPACK_ISA=dotprod"
        "edgepack, tract + ARM kernels (plain NEON)|EDGEPACK_ISA=neon"
        "edgepack, tract + portable kernels|EDGEPACK_ISA=portable"
        "edgepack, kernel interpreter (i8mm)|EDGEPACK_CPU=interp"
        "plain tract (EDGEPACK_KERNELS=off)|EDGEPACK_KERNELS=off"
        "onnxruntime $ort_v, SVE off (NEON, dotprod, i8mm: what edgepack's kernels use)|ORT_NOSVE"
        "onnxruntime $ort_v, -cpu max (its SVE kernels at qemu's vector length, wider than phones')|ORT"
    )
    per() {  # per CONFIG_ENV CASE → instructions per inference
        local env=$1 c=$2 a b
        if [ "$env" = ORT ] || [ "$env" = ORT_NOSVE ]; then
            local QEMU_CPU=max
            [ "$env" = ORT_NOSVE ] && QEMU_CPU=max,sve=off
            a=$(count_py "$dir/scripts/arm_ort_run.py" "$CH$CASES/$c" 1 2>/dev/null | awk '/insns/{print $2}')
            b=$(count_py "$dir/scripts/arm_ort_run.py" "$CH$CASES/$c" 3 2>/dev/null | awk '/insns/{print $2}')
        else
            a=$(export "$env"; count "$CH$MODEL_CHECK" "$CH$CASES/$c" 1 2>/dev/null | awk '/insns/{print $2}')
            b=$(export "$env"; count "$CH$MODEL_CHECK" "$CH$CASES/$c" 3 2>/dev/null | awk '/insns/{print $2}')
        fi
        [ -n "$a" ] && [ -n "$b" ] || { echo "FATAL: counting $c ($env) failed" >&2; exit 1; }
        echo $(( (b - a) / 2 ))
    }
    echo "| millions of instructions per inference, qemu -cpu max, 1 thread | EfficientNet-Lite0 fp32 | EfficientNet-Lite0 INT8 | SqueezeNet 1.0 fp32 | SqueezeNet 1.0 INT8 |"
    echo "|---|---:|---:|---:|---:|"
    local cfg row n
    for cfg in "${configs[@]}"; do
        row="| ${cfg%%|*} |"
        for c in "${models[@]}"; do
            n=$(per "${cfg#*|}" "$c")
            row+=" $(awk -v n="$n" 'BEGIN{printf "%.1f", n/1e6}') |"
        done
        echo "$row"
    done
}

case "${1:-}" in
    setup) setup ;;
    test) setup; project_test ;;
    size) setup; project_size ;;
    all) setup; project_test; project_size ;;
    cargo) shift; cargo_in "$@" ;;
    run) shift; run "$@" ;;
    count) shift; count "$@" ;;
    selftest) setup; selftest ;;
    shell) base_mounts; in_ch bash ;;
    ort-setup) setup; ort_setup ;;
    models) setup; project_models ;;
    bindings) setup; project_bindings ;;
    count-models) setup; project_count ;;
    count-py) shift; count_py "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
