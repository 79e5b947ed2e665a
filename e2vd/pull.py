"""`e2vd pull`: fetch a ModelScope model into the cache ahead of time, verified, placed atomically.

The daemon never downloads (engine.resolve_model only finds what this module placed). Layout,
shared with the engine::

    CACHE/models/OWNER/NAME/REVISION/           the model, complete and verified
    CACHE/models/OWNER/NAME/REVISION/.e2vd-complete   the manifest (JSON, see `Manifest`)
    CACHE/models/OWNER/NAME/.REVISION.partial/  a pull in progress (never read by the daemon)
    CACHE/models/OWNER/NAME/.REVISION.lock      flock(2) held by the pull running, if any

How a pull goes:

1. The file list comes from modelscope's own hub API (``modelscope_hub`` ``HubApi.list_repo_files``,
   ``GET {endpoint}/api/v1/models/ID/repo/files?Revision=R``): each file's path, size in bytes and
   the SHA-256 the hub publishes. The endpoint is ``MODELSCOPE_ENDPOINT`` or ``MODELSCOPE_DOMAIN``
   (``https://`` is added to a bare host, ``http://`` is kept), else www.modelscope.cn.
2. Each file is fetched from the URL modelscope builds (``get_file_download_url``:
   ``{endpoint}/api/v1/models/ID/repo?Revision=R&FilePath=P``) into ``.partial/P.part``; an
   existing ``.part`` is continued with ``Range: bytes=N-`` (resume), its first N bytes hashed
   from disk.
3. Verification, per file: the byte count equals the published Size, and the SHA-256 of all bytes
   equals the published Sha256. A file that fails is deleted and the pull stops; a file the hub
   lists without a Sha256 is refused too (nothing unverified is placed).
4. Placement: a verified ``P.part`` is renamed to ``P``; when all are there the manifest is written,
   modes are set (directories 0755, files 0644: readable by the service's dynamic user, writable
   only by the owner, root under sudo) and ``.REVISION.partial`` is renamed to ``REVISION`` in one
   rename(2). The daemon looks only at ``REVISION/.e2vd-complete``, so it never sees half a model.

modelscope is imported lazily, only here, never by the daemon's request path.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from e2vd.vocabulary import ExitCode

MARKER = ".e2vd-complete"
MAX_MARKER_BYTES = 1 << 20   # a marker lists a few files: read no more than this of one
CHUNK_BYTES = 1 << 20
HTTP_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0
DEFAULT_ENDPOINT = "https://www.modelscope.cn"


class PullError(RuntimeError):
    """A pull that could not finish; the message says what failed and what to do."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class RemoteFile:
    """One file as the hub lists it: repository path, size in bytes, published SHA-256 (hex)."""

    path: str
    size: int
    sha256: str | None


@dataclass
class PullResult:
    """What a pull did: the placed directory, its file count and bytes, bytes fetched this run
    (less than `total_bytes` after a resume or when already present), seconds taken."""

    directory: Path
    files: int
    total_bytes: int
    fetched_bytes: int
    seconds: float
    already_present: bool = False


@dataclass
class Manifest:
    """The ``.e2vd-complete`` file: model id, revision, files (path -> [size, sha256]) and what was
    checked (``"size+sha256"``). A marker from before `e2vd pull` (plain text "ID REVISION")
    reads as verified = None."""

    model_id: str
    revision: str
    files: dict[str, list] = field(default_factory=dict)
    verified: str | None = "size+sha256"

    def dump(self) -> str:
        return json.dumps({"model": self.model_id, "revision": self.revision,
                           "verified": self.verified, "files": self.files}, indent=1) + "\n"

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        with open(path, "rb") as fh:   # a marker is a few KB: more is not one of ours
            text = fh.read(MAX_MARKER_BYTES).decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
            return cls(data["model"], data["revision"], data.get("files", {}), data.get("verified"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            model_id, _, revision = text.strip().partition(" ")
            return cls(model_id, revision, {}, None)


# ----------------------------------------------------------------------------------------------
# Paths


def model_dir(cache_root: Path, model_id: str, revision: str) -> Path:
    """Where a complete pull of `model_id` at `revision` lives."""
    return cache_root / "models" / model_id / revision


def partial_dir(cache_root: Path, model_id: str, revision: str) -> Path:
    """Where a pull in progress lives (a sibling of `model_dir`, hidden, never read by the daemon)."""
    return cache_root / "models" / model_id / f".{revision}.partial"


def is_complete(directory: Path) -> bool:
    """Whether `directory` is a finished pull (the engine's test: marker and model.pt present)."""
    return (directory / MARKER).is_file() and (directory / "model.pt").is_file()


# ----------------------------------------------------------------------------------------------
# The hub


def hub_endpoint(env: dict[str, str] | None = None) -> str:
    """The hub's base URL: MODELSCOPE_ENDPOINT, else MODELSCOPE_DOMAIN, else www.modelscope.cn;
    ``https://`` is prefixed to a value without a scheme (as modelscope does), no trailing slash."""
    env = os.environ if env is None else env
    value = (env.get("MODELSCOPE_ENDPOINT") or env.get("MODELSCOPE_DOMAIN") or "").strip()
    value = value or DEFAULT_ENDPOINT
    if not value.lower().startswith(("http://", "https://")):
        value = "https://" + value
    return value.rstrip("/")


def probe(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Try a TCP connection to the endpoint's host and port (or the HTTPS/HTTP proxy that
    urllib would use) within `timeout_s`; None if it worked, else why not (one phrase)."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def list_files(model_id: str, revision: str, endpoint: str) -> list[RemoteFile]:
    """The model's files at `revision` as the hub lists them (modelscope_hub's list_repo_files).
    Raises PullError when the hub refuses or the listing is empty."""
    try:
        from modelscope_hub.api import HubApi

        infos = HubApi(endpoint=endpoint).list_repo_files(model_id, "model", revision=revision)
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one clear error
        raise PullError(f"the hub at {endpoint} did not list {model_id} at revision {revision}: "
                        f"{err}. Check the id and revision (`e2vd pull ID`), or the network") from err
    files = [RemoteFile(f.path, int(f.size), f.sha256) for f in infos
             if f.path and getattr(f, "type", "blob") != "tree"]
    if not files:
        raise PullError(f"the hub at {endpoint} lists no files for {model_id} at revision {revision}")
    return files


def file_url(model_id: str, path: str, revision: str, endpoint: str) -> str:
    """The download URL of one file, built by modelscope."""
    from modelscope.hub.file_download import get_file_download_url

    return get_file_download_url(model_id, path, revision, endpoint=endpoint)


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Bytes done of a total, with rate (bytes/s over the whole run) and ETA.

    On a terminal one line is redrawn (at most every `every_s` seconds); otherwise a plain line
    is written every `every_s` seconds (default 5 s) and when a file ends."""

    def __init__(self, total: int, out: TextIO, tty: bool | None = None, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.out, self.clock = total, 0, out, clock
        self.tty = out.isatty() if tty is None else tty
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.start = clock()
        self.fetched = 0
        self._last = -1e9
        self.name = ""
        self._shown: tuple[str, int] = ("", -1)

    def skip(self, nbytes: int) -> None:
        """Count bytes already on disk (not fetched now: they do not count towards the rate)."""
        self.done += nbytes

    def add(self, nbytes: int) -> None:
        """Count `nbytes` just received."""
        self.done += nbytes
        self.fetched += nbytes
        if self.clock() - self._last >= self.every_s:
            self.show()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-6)
        rate = self.fetched / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (f"{self.name}  {human_bytes(self.done)} / {human_bytes(self.total)} ({pct:.0f} %)  "
                f"{human_bytes(rate)}/s  ETA {fmt_seconds(eta)}")

    def show(self, final: bool = False) -> None:
        """Write the line now (plain mode: unless the same bytes were already reported)."""
        self._last = self.clock()
        if not self.tty and (self.name, self.done) == self._shown:
            return
        self._shown = (self.name, self.done)
        if self.tty:
            self.out.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_seconds(s: float | None) -> str:
    """Seconds as 'm:ss' or 'h:mm:ss'; '--' when unknown."""
    if s is None:
        return "--"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Downloading one file


def _hash_prefix(path: Path) -> tuple["hashlib._Hash", int]:
    """SHA-256 state and length of what `path` already holds."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            n += len(chunk)
    return h, n


def fetch_file(url: str, remote: RemoteFile, dest: Path, progress: Progress) -> None:
    """Download `remote` into `dest` (via ``dest.part``, continued if present) and verify its size
    and SHA-256 against the hub's listing; on success ``dest.part`` becomes `dest`. A mismatch
    deletes the part file and raises PullError; a cut connection raises PullError and keeps the
    part file for the next run."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if remote.sha256 is None:
        raise PullError(f"the hub publishes no SHA-256 for {remote.path}: refusing to place an "
                        "unverifiable file")
    h, have = _hash_prefix(part) if part.exists() else (hashlib.sha256(), 0)
    if have > remote.size:
        part.unlink()
        h, have = hashlib.sha256(), 0
    progress.skip(have)
    if have < remote.size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                if have and resp.status != 206:      # the server ignored Range: start over
                    part.unlink()
                    progress.skip(-have)
                    h, have = hashlib.sha256(), 0
                with part.open("ab") as f:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        progress.add(len(chunk))
                        if have > remote.size:
                            break
        except (OSError, urllib.error.URLError, http_errors()) as err:
            raise PullError(f"downloading {remote.path} stopped at {human_bytes(have)} of "
                            f"{human_bytes(remote.size)} ({_reason(err)}); run the same "
                            "`e2vd pull` again: it continues where it stopped") from err
    if have != remote.size:
        if have > remote.size:
            part.unlink()
        raise PullError(f"{remote.path}: the hub sent {have} bytes, its listing says {remote.size}"
                        + ("; the part was deleted" if have > remote.size else
                           "; run the same `e2vd pull` again: it continues where it stopped"))
    got = h.hexdigest()
    if got != remote.sha256.lower():
        part.unlink()
        raise PullError(f"{remote.path}: SHA-256 {got} does not match the hub's {remote.sha256}: "
                        "the file was deleted and nothing was placed. Run `e2vd pull` again; if it "
                        "repeats, the hub or a proxy serves wrong bytes")
    os.replace(part, dest)


def http_errors() -> type[Exception]:
    """http.client's base exception (IncompleteRead, RemoteDisconnected ...)."""
    import http.client

    return http.client.HTTPException


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


# ----------------------------------------------------------------------------------------------
# The whole pull


def pull(model_id: str, revision: str, cache_root: Path, out: TextIO = sys.stderr,
         endpoint: str | None = None, tty: bool | None = None,
         progress_every_s: float | None = None) -> PullResult:
    """Make `model_id` at `revision` complete and verified in `cache_root` (see the module doc).

    Already complete: returns at once (already_present=True) without touching the network.
    Raises PullError (exit status 1) with what failed and what to do."""
    t0 = time.monotonic()
    final = model_dir(cache_root, model_id, revision)
    if is_complete(final):
        return PullResult(final, 0, 0, 0, 0.0, already_present=True)
    endpoint = endpoint or hub_endpoint()
    problem = probe(endpoint)
    if problem:
        raise PullError(f"cannot reach the ModelScope hub {endpoint} ({problem}); check the network "
                        "or proxy (https_proxy), or set MODELSCOPE_ENDPOINT to a reachable mirror")
    files = list_files(model_id, revision, endpoint)
    staging = partial_dir(cache_root, model_id, revision)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(staging.with_name(f".{revision}.lock"), model_id):
        return _pull_files(model_id, revision, endpoint, files, staging, final, out, tty,
                           progress_every_s, t0)


@contextlib.contextmanager
def _exclusive(lock_path: Path, model_id: str) -> Iterator[None]:
    """Hold an exclusive flock(2) on `lock_path` for the block; PullError at once if another
    pull of the same model and revision holds it (the lock goes with that process)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another `e2vd pull {model_id}` is running into the same directory; "
                            "wait for it (or stop it: the next pull continues its files)") from None
        yield
    finally:
        os.close(fd)


def _pull_files(model_id: str, revision: str, endpoint: str, files: list[RemoteFile], staging: Path,
                final: Path, out: TextIO, tty: bool | None, progress_every_s: float | None,
                t0: float) -> PullResult:
    """Fetch and verify `files` into `staging`, then place it as `final` (the lock is held)."""
    if is_complete(final):     # another pull finished while this one listed
        return PullResult(final, 0, 0, 0, 0.0, already_present=True)
    staging.mkdir(exist_ok=True)
    total = sum(f.size for f in files)
    out.write(f"pulling {model_id} (revision {revision}) from {endpoint}: {len(files)} files, "
              f"{human_bytes(total)}, into {final}\n")
    urls = {f.path: file_url(model_id, f.path, revision, endpoint) for f in files}
    progress = Progress(total, out, tty=tty, every_s=progress_every_s)
    for remote in files:
        dest = _safe_join(staging, remote.path)
        progress.name = remote.path
        if dest.is_file() and _verified_copy(dest, remote):
            progress.skip(remote.size)
            continue
        fetch_file(urls[remote.path], remote, dest, progress)
        progress.show()
    if progress.tty:
        progress.show(final=True)
    manifest = Manifest(model_id, revision, {f.path: [f.size, f.sha256] for f in files})
    (staging / MARKER).write_text(manifest.dump(), encoding="utf-8")
    _set_modes(staging)
    _place(staging, final)
    return PullResult(final, len(files), total, progress.fetched, time.monotonic() - t0)


def _verified_copy(path: Path, remote: RemoteFile) -> bool:
    """Whether a file placed in the staging directory by an earlier run still matches."""
    if path.stat().st_size != remote.size:
        return False
    h, _ = _hash_prefix(path)
    return h.hexdigest() == (remote.sha256 or "").lower()


def _safe_join(root: Path, rel: str) -> Path:
    """`root/rel`, refusing a listed path that would leave `root` (absolute, '..')."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()) or rel.startswith("/"):
        raise PullError(f"the hub lists a file outside the model directory: {rel!r}; refusing it")
    return root / rel


def _set_modes(root: Path) -> None:
    """Directories 0755, files 0644: every user (the service's dynamic user too) reads, only the
    owner writes."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    for parent in (root.parent, root.parent.parent, root.parent.parent.parent):   # NAME, OWNER, models
        if parent.stat().st_uid == os.geteuid():
            os.chmod(parent, 0o755)


def _place(staging: Path, final: Path) -> None:
    """Rename the finished staging directory to `final`; an incomplete `final` left by an older
    e2vd (no marker) is moved aside and removed first."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(staging, final)
