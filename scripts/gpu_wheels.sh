#!/usr/bin/env bash
# Fill .whl/ with the wheels e2vd needs on the lent GPU machine (the `run` tool's nvidia-h200 image:
# python3 3.12 with torch, numpy, scipy, PyYAML, requests, tqdm, pytest, nvidia-ml-py, numba, ...,
# and no package registry), for scripts/gpu_checks.sh to install there. Run it HERE, where pip
# reaches PyPI; the run call then carries .whl (git-ignored: .gitignore, else .git/info/exclude).
#
#   scripts/gpu_wheels.sh            # cp312 wheels into .whl/, then the size of what travels
#
# Only what the GPU checks import and the image lacks, found by importing e2vd (daemon, server,
# engine, CLI), building a stand-in, recognizing through the engine's light funasr import, then
# `import funasr` + AutoModel on the stand-in, in an environment holding only the image's packages
# plus this list (modelscope, hydra, jieba, transformers' extras ... are not imported on that path;
# funasr prints "Please install torch_complex firstly" and goes on):
#   funasr (its light import needs omegaconf -> antlr4-python3-runtime, kaldiio, librosa, which
#   imports its own needs lazily), soundfile -> cffi -> pycparser, soxr, multipart, and
#   systemd-python, which e2vd.daemon imports through e2vd.systemd even outside systemd.
# antlr4-python3-runtime 4.9.3 and systemd-python 235 have no wheel on PyPI: they are built here
# (systemd-python with a local python3.12, libsystemd-dev and gcc; it links libsystemd.so.0,
# which the image's Ubuntu has).
#
# Environment: GPU_WHEELS_DIR (default .whl), GPU_WHEELS_PYTHON_VERSION (default 3.12; 3.11 fills
# a folder for a local check with this machine's python3.11), GPU_WHEELS_BUILD_PYTHON (the
# interpreter of that version that builds systemd-python; default: found by pyenv or on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS_DIR:-.whl}
PYVER=${GPU_WHEELS_PYTHON_VERSION:-3.12}

# name==version: the versions this project's .venv runs and tests
BINARY=(
    funasr==1.4.16
    omegaconf==2.3.1
    kaldiio==2.18.1
    librosa==0.11.0
    soundfile==0.14.0
    cffi==2.1.1
    pycparser==3.12
    soxr==1.1.0
    multipart==2.0.1
)
BUILT=(antlr4-python3-runtime==4.9.3 systemd-python==235)

if [[ $DIR == .whl ]] && ! git check-ignore -q .whl/x.whl; then
    echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
fi
mkdir -p "$DIR"
rm -f "$DIR"/*.whl

platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DIR" "${BINARY[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

build_python=${GPU_WHEELS_BUILD_PYTHON:-}
if [[ -z $build_python ]]; then
    build_python=$(command -v "python$PYVER" 2>/dev/null || true)
    if [[ -z $build_python ]] || ! "$build_python" -V >/dev/null 2>&1; then
        build_python=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$PYVER".*/bin/python"$PYVER" 2>/dev/null | tail -1)
    fi
fi
if [[ -z $build_python ]] || ! "$build_python" -V >/dev/null 2>&1; then
    echo "gpu_wheels.sh: no python$PYVER here to build ${BUILT[*]}; set GPU_WHEELS_BUILD_PYTHON" >&2
    exit 2
fi
if ! pkg-config --exists libsystemd 2>/dev/null; then
    echo "gpu_wheels.sh: systemd-python needs libsystemd-dev, pkg-config and gcc: apt-get install -y libsystemd-dev pkg-config gcc" >&2
    exit 2
fi
"$build_python" -m pip wheel -q --no-deps --no-binary=:all: -w "$DIR" "${BUILT[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
tag=cp${PYVER/./}
if ! ls "$DIR"/systemd_python-*-"$tag"-*.whl >/dev/null 2>&1; then
    echo "gpu_wheels.sh: $build_python built no $tag wheel of systemd-python" >&2
    exit 1
fi

echo "wheels in $DIR:"
ls -l "$DIR"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}'
echo "wheels together: $(du -cb "$DIR"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}')"
if [[ $DIR == .whl ]]; then
    # what a run call sends: tracked + untracked-not-ignored files, plus the carried .whl (limit 64 MiB)
    tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    whl=$(du -cb .whl | tail -1 | cut -f1)
    awk -v t="$tree" -v w="$whl" 'BEGIN { printf "travels with carry [\".whl\"]: working tree %.1f MiB + .whl %.1f MiB = %.1f MiB of 64 MiB\n", t / 1048576, w / 1048576, (t + w) / 1048576; exit (t + w > 64 * 1048576) }' \
        || { echo "gpu_wheels.sh: over the run tool's 64 MiB" >&2; exit 1; }
fi
