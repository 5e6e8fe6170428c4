#!/bin/sh
# Run `edgekit agent` in an aarch64 build of Python, onnxruntime and LiteRT under qemu user-mode emulation,
# so ARM-only failures of an artifact show up before the board:
#
#   sudo tools/emulate-aarch64.sh setup [DIR]          # once: Debian 12 host, root, ~300 MB in DIR
#   tools/emulate-aarch64.sh agent [DIR] [agent args]  # then: edgekit verify FOLDER --device http://127.0.0.1:8765
#
# Outputs are the ARM runtimes' own; latencies are emulated (tens to hundreds of times slower) and the agent
# labels them so. Needs qemu >= 8 (Debian 12's qemu 7.2 hands the guest the host's /proc/cpuinfo and the ARM
# CPU detection in onnxruntime and LiteRT crashes): qemu-user 10 is taken from bookworm-backports, unpacked
# into DIR, not installed.
set -eu
command=${1:-}
dir=${2:-$HOME/.cache/edgekit/aarch64}
repo=$(cd "$(dirname "$0")/.." && pwd)

case "$command" in
setup)
    mkdir -p "$dir/debs" && cd "$dir/debs"
    dpkg --add-architecture arm64
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/edgekit-backports.list
    apt-get update -qq
    apt-get download -qq qemu-user/bookworm-backports
    apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
        python3.11:arm64 libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 \
        libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 \
        libreadline8:arm64 libuuid1:arm64 libdb5.3:arm64 libgomp1:arm64 libcrypt1:arm64 libnsl2:arm64 \
        libtirpc3:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64 libk5crypto3:arm64 libkrb5support0:arm64 \
        libcom-err2:arm64 libkeyutils1:arm64
    rm /etc/apt/sources.list.d/edgekit-backports.list && apt-get update -qq
    cd "$dir"
    mkdir -p sysroot qemu site
    for deb in debs/*_arm64.deb; do dpkg-deb -x "$deb" sysroot; done
    dpkg-deb -x debs/qemu-user_*_amd64.deb qemu
    # manylinux_2_27 is the only tag of ai-edge-litert 2.x's aarch64 wheels; pip does not infer it
    python3 -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_28_aarch64 -d wheels onnxruntime==1.32.0 ai-edge-litert==2.3.0 onnx==1.23.2 numpy
    for wheel in wheels/*.whl; do python3 -m zipfile -e "$wheel" site; done
    cat > python <<WRAPPER
#!/bin/sh
# aarch64 CPython 3.11 under qemu; neoverse-n1 (the default "max" CPU enables SVE paths ~4x slower in onnxruntime)
export QEMU_LD_PREFIX=$dir/sysroot QEMU_CPU=\${QEMU_CPU:-neoverse-n1}
export PYTHONPATH=$dir/site:$repo\${PYTHONPATH:+:\$PYTHONPATH}
exec $dir/qemu/usr/bin/qemu-aarch64 $dir/sysroot/usr/bin/python3.11 "\$@"
WRAPPER
    chmod +x python
    ./python -c 'import platform, onnxruntime; print("aarch64 emulation ready:", platform.machine(), "onnxruntime", onnxruntime.__version__)'
    ;;
agent)
    [ -x "$dir/python" ] || { echo "run: sudo $0 setup $dir" >&2; exit 2; }
    shift; [ $# -gt 0 ] && shift
    # the agent's worker processes start through the same wrapper (there is no binfmt_misc to run ARM binaries)
    EDGEKIT_WORKER_PYTHON="$dir/python" exec "$dir/python" -m edgekit agent --emulated --name qemu-aarch64 \
        --host 127.0.0.1 "$@"
    ;;
*)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
