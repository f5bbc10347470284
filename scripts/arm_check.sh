#!/usr/bin/env bash
# The package's tests on 64-bit ARM, on an x86-64 Debian/Ubuntu machine: a cross build of the
# library for aarch64 and an aarch64 Python (Debian's arm64 packages, unpacked into a folder)
# run under qemu-aarch64 user emulation. Emulation is bit-exact, so the kernel and exactness
# tests say what an ARM CPU computes (not how fast).
#
#   bash scripts/arm_check.sh setup          # cross compiler, qemu, the arm64 Python (root, apt)
#   bash scripts/arm_check.sh build          # build/arm64: the library for ARM_ARCH
#   bash scripts/arm_check.sh test [ARGS]    # pytest ARGS under emulation (default: the kernel tests)
#   bash scripts/arm_check.sh python [ARGS]  # the emulated Python itself
#
# ARM_ARCH (default armv8.6-a+dotprod+fp16+i8mm: Graviton3/4, Apple M2 and later; i8mm's
# two-row kernels are what vendor patch 0023 keeps off verify batches) picks the target;
# ARM_BUILD (default build/arm64) and ARM_SYSROOT (default build/arm64-sysroot) where they go.
# tests/test_arm_emulated.py runs the kernel tests this way wherever setup and build were done.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${ARM_BUILD:-$root/build/arm64}"
sysroot="${ARM_SYSROOT:-$root/build/arm64-sysroot}"
arch="${ARM_ARCH:-armv8.6-a+dotprod+fp16+i8mm}"
python_pkgs=(python3 python3-numpy python3-cffi python3-jinja2 python3-pytest python3-yaml python3-tqdm python3-requests)

setup() {
    local want=()
    command -v aarch64-linux-gnu-g++ >/dev/null || want+=(g++-aarch64-linux-gnu gcc-aarch64-linux-gnu)
    command -v qemu-aarch64-static >/dev/null || want+=(qemu-user-static)
    command -v cmake >/dev/null || want+=(cmake)
    command -v ninja >/dev/null || want+=(ninja-build)
    if [ "${#want[@]}" -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null
    fi
    [ -x "$sysroot/usr/bin/python3" ] && return 0
    # Debian's arm64 packages with their dependencies, resolved against an empty system and
    # unpacked (not installed) into the sysroot; apt state lives in a scratch folder
    local apt_dir; apt_dir="$(mktemp -d)"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/debs/partial" "$sysroot.partial"
    touch "$apt_dir/status"
    local o=(-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists="$apt_dir/lists"
             -oDir::State::status="$apt_dir/status" -oDir::Cache::archives="$apt_dir/debs" -oDebug::NoLocking=1 -oAPT::Sandbox::User=root)
    apt-get "${o[@]}" update -qq
    apt-get "${o[@]}" install --download-only -y -qq --no-install-recommends "${python_pkgs[@]}" >/dev/null
    for deb in "$apt_dir"/debs/*.deb; do dpkg -x "$deb" "$sysroot.partial"; done
    local lib="$sysroot.partial/usr/lib/aarch64-linux-gnu"
    # what dpkg's alternatives would have linked, and the C++ runtime the library needs
    ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
    ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
    cp -a /usr/aarch64-linux-gnu/lib/libstdc++.so.6* /usr/aarch64-linux-gnu/lib/libgomp.so.1* "$lib/"
    # gguf (pure Python, not packaged by Debian 12)
    "$(command -v python3 || command -v python)" -m pip install -q --no-deps --target "$sysroot.partial/opt/site" "gguf>=0.19"
    rm -rf "$apt_dir" "$sysroot"
    mv "$sysroot.partial" "$sysroot"
}

build() {
    local toolchain="$build.toolchain.cmake"
    mkdir -p "$(dirname "$build")"
    cat >"$toolchain" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
EOF
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" >/dev/null
    cmake --build "$build" --target pmtp
}

emulated_python() {
    [ -x "$sysroot/usr/bin/python3" ] || { echo "no arm64 Python in $sysroot: run '$0 setup' first" >&2; exit 2; }
    [ -f "$build/bin/libpmtp.so" ] || { echo "no ARM build in $build: run '$0 build' first" >&2; exit 2; }
    # the source tree's package with the ARM library; QEMU_CPU=max offers every extension
    PYLLAMA_MTP_LIB_DIR="$build/bin" PYTHONPATH="$root:$sysroot/opt/site" QEMU_CPU="${QEMU_CPU:-max}" \
        exec qemu-aarch64-static -L "$sysroot" "$sysroot/usr/bin/python3" "$@"
}

case "${1:-}" in
    setup) setup ;;
    build) build ;;
    python) shift; emulated_python "$@" ;;
    test)
        shift
        cd "$root/tests"
        [ "$#" -gt 0 ] || set -- test_kernels_matmul.py test_kernels_attention.py test_kernels_rows.py
        emulated_python -m pytest -q -p no:cacheprovider "$@" ;;
    *) echo "usage: $0 setup | build | test [pytest args] | python [args]" >&2; exit 2 ;;
esac
