"""Where a lake lives: a local directory or an S3 (or S3-compatible) prefix.

A lake root is either a path or a URI ``s3://bucket/prefix`` (``s3a://`` is accepted too).
For object storage, ``deltalake`` needs its ``storage_options``; they are built here from the
standard AWS environment variables, so a collaborator configures VRP exactly as they configure
the AWS CLI:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN`` for temporary keys);
- ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``);
- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server (MinIO, Ceph, R2);
- ``AWS_ALLOW_HTTP=true`` for a plain-http endpoint (set automatically when the endpoint URL
  starts with ``http://``).

Concurrent writers are made safe by conditional writes: a Delta commit creates
``_delta_log/<version>.json`` with a put that fails if the object exists (``If-None-Match``),
and delta-rs retries a losing append on the next version. ``conditional_put=etag`` is set
explicitly, so a change of library default cannot silently turn it off. No lock (DynamoDB) is
needed or supported: deltalake 1.x dropped it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vrp.lake.errors import LakeError

#: URI schemes served as S3.
S3_SCHEMES = ("s3", "s3a")

#: AWS environment variables passed to deltalake as they are (first one set wins per key).
_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "AWS_ACCESS_KEY_ID": ("AWS_ACCESS_KEY_ID",),
    "AWS_SECRET_ACCESS_KEY": ("AWS_SECRET_ACCESS_KEY",),
    "AWS_SESSION_TOKEN": ("AWS_SESSION_TOKEN",),
    "AWS_REGION": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "AWS_ENDPOINT_URL": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "AWS_ALLOW_HTTP": ("AWS_ALLOW_HTTP",),
}


class LakeStorageError(LakeError):
    """The lake's storage could not be reached or refused the request (credentials, bucket, endpoint)."""


def scheme(root: str | os.PathLike[str]) -> str:
    """The URI scheme of a lake root ('' for a local path)."""
    text = os.fspath(root)
    if "://" not in text:
        return ""
    return urlparse(text).scheme.lower()


def is_remote(root: str | os.PathLike[str]) -> bool:
    """Whether the lake root is an object-store URI rather than a local directory."""
    return scheme(root) != ""


def normalize_root(root: str | os.PathLike[str]) -> str:
    """A canonical lake root: a normalised local path, or an ``s3://bucket/prefix`` URI without a
    trailing slash. Other URI schemes are refused with a clear message."""
    text = os.fspath(root)
    kind = scheme(text)
    if kind == "":
        return os.fspath(Path(text))
    if kind not in S3_SCHEMES:
        raise LakeStorageError(
            f"lake root {text}: only local directories and s3:// URIs (AWS S3 or an S3-compatible "
            "server via AWS_ENDPOINT_URL) are supported"
        )
    parsed = urlparse(text)
    if not parsed.netloc:
        raise LakeStorageError(f"lake root {text} names no bucket; use s3://BUCKET/PREFIX")
    return text.rstrip("/")


def join(root: str, *parts: str) -> str:
    """A path (or URI) inside the lake root."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def storage_options(root: str | os.PathLike[str], env: dict[str, str] | None = None) -> dict[str, str] | None:
    """deltalake ``storage_options`` for the root: None for a local lake, else the AWS settings
    found in the environment (`env`, default ``os.environ``) plus conditional writes."""
    if not is_remote(root):
        return None
    env = dict(os.environ) if env is None else env
    options: dict[str, str] = {}
    for key, names in _ENV_KEYS.items():
        for name in names:
            if env.get(name):
                options[key] = env[name]
                break
    endpoint = options.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://") and "AWS_ALLOW_HTTP" not in options:
        options["AWS_ALLOW_HTTP"] = "true"
    options["conditional_put"] = "etag"
    return options


def arrow_filesystem(root: str) -> tuple[Any, str]:
    """A pyarrow filesystem for plain files beside the tables (e.g. an export's card), configured
    like deltalake's, and the root's path inside it (``bucket/prefix``)."""
    from pyarrow import fs

    options = storage_options(root) or {}
    parsed = urlparse(root)
    endpoint = options.get("AWS_ENDPOINT_URL")
    s3 = fs.S3FileSystem(
        access_key=options.get("AWS_ACCESS_KEY_ID"),
        secret_key=options.get("AWS_SECRET_ACCESS_KEY"),
        session_token=options.get("AWS_SESSION_TOKEN"),
        region=options.get("AWS_REGION"),
        endpoint_override=endpoint,
        scheme="http" if endpoint and endpoint.startswith("http://") else "https",
    )
    return s3, f"{parsed.netloc}{parsed.path}".rstrip("/")


def filesystem(root: str) -> tuple[Any, str]:
    """A pyarrow filesystem for a lake root (local disk or S3) and the root's path inside it."""
    if is_remote(root):
        return arrow_filesystem(root)
    from pyarrow import fs

    return fs.LocalFileSystem(), os.path.abspath(root)


def storage_error(exc: BaseException, where: str) -> LakeStorageError:
    """A clear error for a failed object-store request: what went wrong and what to check."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # deltalake colours its error chains
    lowered = text.lower()
    first = " ".join(text.replace("↳", "").split())[:300]
    if any(
        marker in lowered
        for marker in (
            "privileges",
            "403",
            "forbidden",
            "accessdenied",
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "credential",
        )
    ):
        hint = (
            "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
            "and that they may read and write this bucket"
        )
    elif "nosuchbucket" in lowered or ("bucket" in lowered and "not" in lowered and "exist" in lowered):
        hint = "the bucket does not exist: create it first, or fix the bucket name"
    elif any(marker in lowered for marker in ("connect", "dns", "timed out", "timeout", "unreachable")):
        hint = "the storage endpoint cannot be reached: check AWS_ENDPOINT_URL and the network"
    else:
        hint = "the object store refused the request"
    return LakeStorageError(f"{where}: {hint} ({first})")


@contextlib.contextmanager
def translated_errors(path: str) -> Iterator[None]:
    """Turn an object-store failure (an ``OSError`` from deltalake) at `path` into a clear error."""
    try:
        yield
    except OSError as exc:
        if not is_remote(path):
            raise
        raise storage_error(exc, f"cannot write lake table {path}") from exc
