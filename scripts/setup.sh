#!/usr/bin/env bash
# Set up e2vd on a fresh Debian machine and run its main job: the socket-activated daemon under
# systemd, answering a first request.
#
#   sudo scripts/setup.sh [MODEL]
#
# MODEL (default: iic/emotion2vec_plus_large, pulled from ModelScope by `e2vd install`):
#   an absolute model directory readable by the service (not below /root or /home), or
#   tiny-standin / large-standin to build a stand-in with random weights in /srv/e2vd-models
#   (for machines without a model hub).
# Steps: apt packages; a venv in $E2VD_PREFIX (default /opt/e2vd) with e2vd installed; the
# systemd units (`e2vd install`: group e2vd, e2vd.socket, e2vd-warmup.timer); then one
# `e2vd recognize` on a generated 2 s clip, which wakes the daemon through the socket.
#
# Needs systemd as PID 1 (sd_booted: /run/systemd/system exists). Without it (a plain container)
# it changes nothing and says, in one line, the two ways that work; exit 2.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -d /run/systemd/system ]]; then
    echo "setup.sh: systemd is not PID 1 here (PID 1 is '$(cat /proc/1/comm 2>/dev/null || echo '?')'), so e2vd's" \
         "socket-activated units cannot be installed or run; two ways work: run the daemon in the foreground," \
         "\`pip install . && e2vd serve --socket /run/e2vd/e2vd.sock --model DIR\` (see the README's" \
         "containers section), or use a container with systemd as PID 1, e.g." \
         "\`podman run --systemd=always IMAGE /sbin/init\`" >&2
    exit 2
fi
[[ $(id -u) == 0 ]] || { echo "setup.sh: run as root (sudo $0 $*)" >&2; exit 2; }
PREFIX=${E2VD_PREFIX:-/opt/e2vd}
MODEL=${1:-}

echo "== apt packages"
pkgs=(libsystemd-dev pkg-config gcc curl)
python3 -m venv --help >/dev/null 2>&1 || pkgs+=(python3-venv python3-dev)
apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null

echo "== e2vd into $PREFIX"
[[ -x $PREFIX/bin/python ]] || python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install -q .
ln -sf "$PREFIX/bin/e2vd" /usr/local/bin/e2vd

case $MODEL in
    tiny-standin|large-standin)
        dir=/srv/e2vd-models/${MODEL%-standin}
        if [[ ! -f $dir/model.pt ]]; then
            echo "== building the ${MODEL%-standin} stand-in model in $dir"
            "$PREFIX/bin/python" -m e2vd.standin "${MODEL%-standin}" "$dir"
        fi
        MODEL=$dir ;;
esac

echo "== systemd units"
e2vd install ${MODEL:+--model "$MODEL"} --web   # --web: the browser page on 127.0.0.1:7860 (e2vd-web.socket)

echo "== first request (wakes the daemon through the socket)"
clip=$(mktemp --suffix=.wav)
trap 'rm -f "$clip"' EXIT
"$PREFIX/bin/python" - "$clip" <<'PY'
import sys
import numpy as np
import soundfile as sf
t = np.arange(32000) / 16000
sf.write(sys.argv[1], (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype("float32"), 16000)
PY
e2vd recognize "$clip"
e2vd status

echo "== the browser page (opening it starts only the page's small front, never the daemon)"
if curl -fsS -o /dev/null --max-time 10 http://127.0.0.1:7860/; then
    echo "open http://127.0.0.1:7860/ in a browser on this machine (from another: ssh -L 7860:127.0.0.1:7860 $(hostname))"
else
    echo "setup.sh: the page does not answer on 127.0.0.1:7860; see systemctl status e2vd-web.socket e2vd-web.service" >&2
    exit 1
fi
