"""The `e2vd pull [MODEL]` and `e2vd models [--prune]` commands (the work is in e2vd.pull)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from e2vd import pull
from e2vd.vocabulary import ExitCode


class PullUsage(ValueError):
    """A pull that makes no sense as asked (a local directory, a malformed id)."""

    exit_code = ExitCode.USAGE


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Add the `pull` and `models` subcommands to `e2vd`'s parser."""
    p = sub.add_parser(
        "pull", help="download and verify a ModelScope model into the cache (root, before install)",
        description="Download MODEL (default: the configured model) at e2vd's pinned revision into "
                    "cache_dir through ModelScope's hub API, verify every file's size and SHA-256 "
                    "against the hub's listing, and place it atomically. Interrupted? Run it again: "
                    "it continues. The daemon never downloads. Exit 0 done, 1 failed, 2 usage.")
    p.add_argument("model", nargs="?", help="ModelScope id owner/name (default: `model` in the config)")
    p.add_argument("--revision", help="hub revision (default: the one this e2vd is pinned to)")
    p.add_argument("--cache-dir", help="cache directory (default: cache_dir in the config, /var/cache/e2vd)")
    p.add_argument("--config", help="settings file (default $E2VD_CONFIG or /etc/e2vd/e2vd.toml)")
    m = sub.add_parser("models", help="list the model cache; --prune removes what the config does not use",
                       description="List the models in cache_dir: id, revision, size, verified or not, "
                                   "and whether the configuration uses it.")
    m.add_argument("--prune", action="store_true",
                   help="remove every cached model (and unfinished pull) the configuration does not use")
    m.add_argument("--cache-dir", help="cache directory (default: cache_dir in the config)")
    m.add_argument("--config", help="settings file (default $E2VD_CONFIG or /etc/e2vd/e2vd.toml)")


def run(args: argparse.Namespace) -> int:
    """Run `pull` or `models`; the exit status."""
    return cmd_pull(args) if args.command == "pull" else cmd_models(args)


def _settings(args: argparse.Namespace):
    from e2vd.config import load_settings

    return load_settings(config_path=args.config)


def _pinned_revision() -> str:
    from e2vd.engine import DEFAULT_REVISION   # the engine is the one place the pin lives

    return DEFAULT_REVISION


def cmd_pull(args: argparse.Namespace) -> int:
    from e2vd.config import MODEL_ID_PATTERN

    settings = _settings(args)
    model = args.model or settings.model
    if os.path.isabs(os.path.expanduser(model)) or model.startswith(("./", "../")):
        raise PullUsage(f"the model {model} is a local directory: there is nothing to pull "
                        "(give a ModelScope id, e.g. `e2vd pull iic/emotion2vec_plus_large`)")
    if not MODEL_ID_PATTERN.fullmatch(model):
        raise PullUsage(f"{model!r} is not a ModelScope id owner/name (e.g. iic/emotion2vec_plus_large)")
    cache = Path(args.cache_dir or settings.cache_dir)
    revision = args.revision or _pinned_revision()
    try:
        result = pull.pull(model, revision, cache, out=sys.stderr)
    except PermissionError as err:
        raise pull.PullError(f"cannot write into {cache} ({err.strerror}: {err.filename}); "
                             f"run: sudo e2vd pull {model}") from err
    except KeyboardInterrupt:
        sys.stderr.write(f"\ne2vd: pull: stopped; what was fetched is kept: run `e2vd pull {model}` "
                         "again to continue\n")
        raise
    if result.already_present:
        print(f"{model} (revision {revision}) is already pulled and verified: {result.directory}")
    else:
        print(f"pulled {model} (revision {revision}): {result.files} files, "
              f"{pull.human_bytes(result.total_bytes)} verified (size + SHA-256), "
              f"{pull.human_bytes(result.fetched_bytes)} fetched in {result.seconds:.0f} s, into {result.directory}")
    return int(ExitCode.OK)


@dataclass
class CachedModel:
    """One entry of the cache: id, revision, directory, bytes on disk, state
    ("verified", "unverified" for a pre-pull daemon download, "incomplete" for an unfinished pull)."""

    model_id: str
    revision: str
    directory: Path
    size: int
    state: str


def scan(cache: Path) -> list[CachedModel]:
    """Every model directory and unfinished pull under ``cache/models/OWNER/NAME/``."""
    found: list[CachedModel] = []
    root = cache / "models"
    for name_dir in sorted(root.glob("*/*")):
        if not name_dir.is_dir():
            continue
        model_id = f"{name_dir.parent.name}/{name_dir.name}"
        for rev_dir in sorted(name_dir.iterdir()):
            if not rev_dir.is_dir() or rev_dir.name.startswith(".") and not rev_dir.name.endswith(".partial"):
                continue
            if rev_dir.name.endswith(".partial"):
                revision, state = rev_dir.name[1:-len(".partial")], "incomplete"
            elif pull.is_complete(rev_dir):
                revision = rev_dir.name
                state = "verified" if pull.Manifest.read(rev_dir / pull.MARKER).verified else "unverified"
            else:
                revision, state = rev_dir.name, "incomplete"
            size = sum(p.stat().st_size for p in rev_dir.rglob("*") if p.is_file())
            found.append(CachedModel(model_id, revision, rev_dir, size, state))
    return found


def cmd_models(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cache = Path(args.cache_dir or settings.cache_dir)
    used = (settings.model, _pinned_revision())
    try:
        entries = scan(cache)
    except PermissionError as err:
        raise pull.PullError(f"cannot read the model cache {cache} ({err.strerror}: {err.filename}); "
                             f"run: sudo e2vd {' '.join(['models', *(['--prune'] if args.prune else [])])}") from err
    if not entries:
        print(f"no models in {cache}/models; run: sudo e2vd pull")
        return int(ExitCode.OK)
    print(f"{'MODEL':<34} {'REVISION':<10} {'SIZE':>10}  {'STATE':<10}  USED")
    for e in entries:
        in_use = (e.model_id, e.revision) == used
        print(f"{e.model_id:<34} {e.revision:<10} {pull.human_bytes(e.size):>10}  {e.state:<10}  "
              f"{'yes' if in_use else 'no'}")
    if args.prune:
        for e in entries:
            if (e.model_id, e.revision) != used:
                shutil.rmtree(e.directory)
                (e.directory.parent / f".{e.revision}.lock").unlink(missing_ok=True)
                print(f"removed {e.directory} ({pull.human_bytes(e.size)})")
                _remove_empty_parents(e.directory.parent, stop=cache / "models")
    return int(ExitCode.OK)


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    """Remove `directory` and its parents up to (not including) `stop` while they are empty."""
    while directory != stop and directory.is_relative_to(stop):
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def pull_configured(config: Path, out=sys.stderr) -> pull.PullResult | None:
    """`e2vd install`'s pull: the model named by the settings file `config` (and E2VD_* in the
    environment), at the pinned revision, into its cache_dir. None when the model is a local
    directory (nothing to pull). Raises PullError, its message ending with what --no-pull does."""
    from e2vd.config import MODEL_ID_PATTERN, load_settings

    settings = load_settings(config_path=str(config))
    model = settings.model
    if os.path.isabs(os.path.expanduser(model)) or not MODEL_ID_PATTERN.fullmatch(model):
        return None
    try:
        return pull.pull(model, _pinned_revision(), Path(settings.cache_dir), out=out)
    except pull.PullError as err:
        raise pull.PullError(f"{err}. The units are written but not enabled; run `sudo e2vd install` "
                             "again, or `sudo e2vd install --no-pull` to enable them now (the daemon "
                             f"answers model_unavailable until `sudo e2vd pull {model}` has run)") from err
