"""Where data and outputs live: a local path or an object store (``s3://``, ``gs://``), one definition for all.

:func:`parse` checks a location a user gave (a config key, a flag) and refuses, in one line naming the value and
the key, a scheme this package does not read or write, before anything is written: never a local folder named
``s3:``. A :class:`Location` reads, writes, lists and deletes through a ``pyarrow.fs`` filesystem opened from the
standard environment: for S3, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) selects the server,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or the AWS config files, or the instance's role) the
credentials and ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``) the region; for GCS, Google's application default
credentials. :func:`upload` and :func:`download` move files and directory trees; object stores have no rename,
so a directory is *published* by writing every part first and the object its readers look for (a marker) last.

A leaf: it imports nothing of the project, so ``data_prep`` uses it too (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = ("s3", "gs")  # object stores; a local path or file:// is the other kind of location
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # "s3a:/x", "s3:bucket": meant as a URI, not a path
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}$")
_COPY_BLOCK = 8 << 20
_THREADS = 8  # parallel transfers: object stores answer one request per file at a time


class UnsupportedLocation(ValueError):
    """A location this package cannot use (an unknown scheme, a malformed URI); the message names it."""


class StorageError(OSError):
    """Reading, writing or listing an object store failed; the message names the URI."""


@dataclass(frozen=True)
class Location:
    """A directory or file: local (``scheme == ""``) or in an object store. ``path`` is what the filesystem
    takes (``bucket/key`` for an object store, the local path otherwise); ``uri`` is what messages show."""

    scheme: str
    path: str

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Location:
        return Location(self.scheme, f"{self.path.rstrip('/')}/{name}" if self.path else name)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def _p(self) -> str:  # what the filesystem takes: pyarrow's local filesystem wants absolute paths
        return self.path if self.scheme else os.path.abspath(self.path)

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme, self.path.split("/", 1)[0] if self.scheme else "")

    def exists(self) -> bool:
        return self._call(self.fs.get_file_info, self._p).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._call(self.fs.get_file_info, self._p).type == pafs.FileType.File

    def size(self) -> int | None:
        """The file's size in bytes; None when there is no file here."""
        info = self._call(self.fs.get_file_info, self._p)
        return info.size if info.type == pafs.FileType.File else None

    def is_dir(self) -> bool:
        """A directory, or for an object store, a prefix some object lies under."""
        return self._call(self.fs.get_file_info, self._p).type == pafs.FileType.Directory

    def open_stream(self) -> pa.NativeFile:
        """A sequential reader."""
        return self._call(self.fs.open_input_stream, self._p)

    def read_bytes(self) -> bytes:
        with self.open_stream() as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_output(self) -> pa.NativeFile:
        """A writer; in an object store the object appears (whole) when it is closed."""
        if not self.remote:
            Path(self._p).parent.mkdir(parents=True, exist_ok=True)
        return self._call(self.fs.open_output_stream, self._p)

    def write_bytes(self, data: bytes) -> None:
        """One object, replaced whole: readers see the old bytes or the new ones, never a mix."""
        with self.open_output() as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def open_input(self) -> pa.NativeFile:
        """A random-access reader (Parquet footers and row groups read as ranged requests)."""
        return self._call(self.fs.open_input_file, self._p)

    def files(self) -> dict[str, int]:
        """Every file below this directory (recursively): relative path → size; empty when there is none."""
        selector = pafs.FileSelector(self._p, recursive=True, allow_not_found=True)
        prefix = self._p.rstrip("/") + "/"
        return {
            info.path[len(prefix) :]: info.size
            for info in self._call(self.fs.get_file_info, selector)
            if info.type == pafs.FileType.File
        }

    def children(self) -> list[str]:
        """The names of the files and directories directly below this one."""
        selector = pafs.FileSelector(self._p, recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self._call(self.fs.get_file_info, selector))

    def delete(self) -> None:
        """Delete this file, or this directory and everything below it; nothing there is fine."""
        info = self._call(self.fs.get_file_info, self._p)
        if info.type == pafs.FileType.File:
            self._call(self.fs.delete_file, self._p)
        elif info.type == pafs.FileType.Directory:
            self._call(self.fs.delete_dir, self._p)

    def _call(self, fn: Callable, *args):
        try:
            return fn(*args)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri}: not found") from exc
        except OSError as exc:  # the store's own words, on one line, with the URI in front
            detail = " ".join(str(exc).split())
            raise StorageError(f"{self.uri}: {detail}") from exc


def parse(value: str | os.PathLike, what: str) -> Location:
    """``value`` as a location, or :class:`UnsupportedLocation` naming ``what`` (e.g. "config key 'output_dir'",
    "--output"). Accepted: a local path, ``file:///abs/path``, ``s3://bucket[/key]``, ``gs://bucket[/key]``."""
    text = os.fspath(value).strip()
    supported = "use a local path, file:///path, s3://bucket/path or gs://bucket/path"
    if not text:
        raise UnsupportedLocation(f"{what} is empty: {supported}")
    uri = _URI.match(text)
    if uri is None:
        if _SCHEME_LIKE.match(text):
            raise UnsupportedLocation(
                f"{what}: {text!r} is not a supported location ({supported}; a local path with a colon: "
                f"./{text})"
            )
        return Location("", str(Path(text).expanduser()))
    scheme, rest = uri.group(1).lower(), uri.group(2)
    if scheme == "file":
        if not rest.startswith("/"):
            raise UnsupportedLocation(f"{what}: {text!r} names a host; file:// takes an absolute path only")
        return Location("", rest)
    if scheme not in SCHEMES:
        raise UnsupportedLocation(f"{what}: {text!r} has scheme {scheme}://, not supported ({supported})")
    bucket, _, key = rest.partition("/")
    parts = [p for p in key.split("/") if p]
    if not _BUCKET.match(bucket):
        raise UnsupportedLocation(f"{what}: {text!r} has no valid bucket name after {scheme}://")
    if any(p in (".", "..") for p in parts):
        raise UnsupportedLocation(f"{what}: {text!r} has '.' or '..' in its path")
    return Location(scheme, "/".join([bucket, *parts]))


@functools.cache
def _filesystem(scheme: str, bucket: str, environment: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    env = dict(environment)
    if scheme == "s3":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not region and not endpoint:  # AWS itself: the bucket's region, or every request is redirected
            try:
                region = pafs.resolve_s3_region(bucket)
            except OSError as exc:
                raise StorageError(f"s3://{bucket}: cannot find the bucket's region ({exc})") from exc
        options = {"endpoint_override": endpoint, "region": region}
        return pafs.S3FileSystem(**{k: v for k, v in options.items() if v})
    if scheme == "gs":
        return pafs.GcsFileSystem()
    return pafs.LocalFileSystem()


_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def server_environment() -> dict[str, str]:
    """The variables set here that select the object store's server and region (no secrets among them)."""
    return {k: os.environ[k] for k in _ENVIRONMENT if os.environ.get(k)}


def filesystem(scheme: str, bucket: str = "") -> pafs.FileSystem:
    """The filesystem of ``scheme`` ("" = local), opened once per process for the environment it sees."""
    environment = tuple(server_environment().items())
    try:
        return _filesystem(scheme, bucket, environment)
    except ImportError as exc:  # a pyarrow built without this store (conda's pyarrow-core)
        extra = "gcs" if scheme == "gs" else scheme
        raise StorageError(
            f"{scheme}:// needs a pyarrow built with {scheme} support: pip install -e '.[{extra}]' ({exc})"
        ) from exc


def cache_root() -> Path:
    """This node's cache: ``$SPARSEBERT_CACHE``, else ~/.cache/sparsebert."""
    return Path(os.environ.get("SPARSEBERT_CACHE", Path.home() / ".cache" / "sparsebert")).expanduser()


def local_mirror(location: Location, kind: str, *, per_host: bool = False) -> Path:
    """A node-local directory standing for ``location`` (``kind``: what it holds, e.g. "outputs"): the same
    remote location always maps to the same directory, so a restarted process finds what it left there.
    ``per_host``: one per machine, also when ``$SPARSEBERT_CACHE`` (or the home directory) is shared by several.
    A local location is its own directory."""
    if not location.remote:
        return Path(location.path)
    root = cache_root() / kind
    return (root / socket.gethostname() if per_host else root) / location.scheme / location.path


def upload(
    local: Path, dest: Location, *, last: Iterable[str] = (), only: Iterable[str] | None = None
) -> None:
    """Copy the file ``local``, or every file below the directory ``local``, to ``dest``; the relative paths in
    ``last`` go after all the others (a marker that says the rest is complete); ``only``: just these."""
    if local.is_file():
        _copy_out(local, dest)
        return
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    if only is not None:
        names = [n for n in names if n in set(only)]
    final = [n for n in names if n in set(last)]
    parallel(lambda n: _copy_out(local / n, dest / n), [n for n in names if n not in final])
    for name in final:
        _copy_out(local / name, dest / name)


def download(
    source: Location, local: Path, *, keep: Callable[[str], bool] | None = None, files: dict | None = None
) -> list[str]:
    """Copy the files below ``source`` (those whose relative path ``keep`` accepts) into ``local``; each file
    appears whole or not at all (written aside, then renamed). ``files``: the listing, when already made.
    Returns the relative paths copied."""
    names = sorted(n for n in (source.files() if files is None else files) if keep is None or keep(n))
    parallel(lambda n: _copy_in(source / n, local / n), names)
    return names


def download_file(source: Location, local: Path) -> bool:
    """Copy one file (whole or not at all); False when ``source`` does not exist."""
    try:
        _copy_in(source, local)
    except FileNotFoundError:
        return False
    return True


def copy(source: Location, dest: Location) -> None:
    """Copy one file within a store (server-side in an object store: nothing passes through this machine)."""
    if source.scheme != dest.scheme:
        raise ValueError(f"cannot copy {source} to {dest}: not in the same store")
    dest._call(dest.fs.copy_file, source._p, dest._p)


def publish(local: Path, dest: Location, marker: str, *, replace: bool = False) -> None:
    """Upload the directory ``local`` to ``dest`` with ``marker`` (the file readers check first) written last.
    ``replace``: ``dest`` may hold an earlier version; its marker goes first (readers then see "not there"
    rather than a mix), then the files this version does not have, so ``dest`` ends up exactly ``local``."""
    if replace:
        (dest / marker).delete()
        ours = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
        stale = [n for n in dest.files() if n not in ours]
        parallel(lambda n: (dest / n).delete(), stale)
    upload(local, dest, last=[marker])


def _copy_out(local: Path, dest: Location) -> None:
    with open(local, "rb") as src, dest.open_output() as out:
        shutil.copyfileobj(src, out, _COPY_BLOCK)


def _copy_in(source: Location, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with source.open_stream() as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_BLOCK)
        os.replace(partial, local)
    finally:
        partial.unlink(missing_ok=True)


def parallel(fn: Callable[[str], object], names: list[str]) -> None:
    """``fn(name)`` for every name, a few at a time (object stores answer one request per file at a time)."""
    if len(names) <= 1:
        for name in names:
            fn(name)
        return
    with ThreadPoolExecutor(min(_THREADS, len(names))) as pool:
        for future in [pool.submit(fn, name) for name in names]:
            future.result()  # the first failure is raised, naming its file
