"""The `e2vd` command: argument parsing and dispatch to the module that does the work.

Exit codes (DESIGN §3): 0 ok, 2 usage, 3 daemon unreachable, 4 request rejected, 5 server error.
This module imports nothing heavy at start; each subcommand imports what it needs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED, EXIT_SERVER = 0, 2, 3, 4, 5


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand (the contract of DESIGN §3)."""
    p = argparse.ArgumentParser(prog="e2vd", description="Emotion2Vec+ speech emotion recognition daemon and client.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--socket", help="bind this Unix socket path (ignored when systemd passes a socket)")
    s.add_argument("--model", help="absolute model directory or ModelScope id")
    s.add_argument("--device", help="auto, cpu or cuda:N")
    s.add_argument("--idle-timeout", type=float, dest="idle_timeout", metavar="S",
                   help="exit after S seconds with nothing to do")
    s.add_argument("--config", help="config file (default /etc/e2vd/e2vd.toml)")

    r = sub.add_parser("recognize", help="recognise the emotion in audio files")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--socket", help="daemon socket (default $E2VD_SOCKET or /run/e2vd/e2vd.sock)")
    r.add_argument("--granularity", choices=["utterance", "frame"], default="utterance")
    r.add_argument("--embedding", metavar="OUT.npy", help="write the embedding to this .npy file")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")

    st = sub.add_parser("status", help="show whether the daemon runs (never wakes it)")
    st.add_argument("--socket", help="ask a daemon started by hand on this socket")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("warmup", help="wake the daemon and keep it warm")
    w.add_argument("--socket")
    w.add_argument("--hold", metavar="DURATION", help="keep warm this long, e.g. 90s, 30m, 9h")
    w.add_argument("--until", metavar="HH:MM", help="keep warm until this local time today")

    i = sub.add_parser("install", help="install and start the systemd units (root)")
    i.add_argument("--group", default="e2vd")
    i.add_argument("--warmup-calendar", default="Mon..Fri 08:55", help="OnCalendar= of e2vd-warmup.timer")
    i.add_argument("--warmup-until", default="18:00", help="keep warm until this local time")
    i.add_argument("--no-start", action="store_true", help="enable the units but do not start them")

    u = sub.add_parser("uninstall", help="remove the systemd units (root)")
    u.add_argument("--purge", action="store_true", help="also remove the config and the model cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `e2vd` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from e2vd import daemon

        overrides = {k: v for k in ("socket", "model", "device", "idle_timeout")
                     if (v := getattr(args, k)) is not None}
        return daemon.main(overrides, config_path=args.config)
    if args.command in ("install", "uninstall"):
        from e2vd import install

        return install.main(args)
    print(f"e2vd {args.command}: not implemented yet", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
