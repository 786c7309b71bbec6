"""Exceptions raised by the lake, each saying what is wrong and what to do about it."""

from __future__ import annotations

import re


class LakeError(RuntimeError):
    """Base class of every error the lake raises on purpose."""


class LakeValidationError(LakeError, ValueError):
    """A batch was rejected before anything was written.

    Carries the table, column and sample so the caller can report (or quarantine) exactly the
    offending row; ``sample_id`` is None when the problem is not tied to one row.
    """

    def __init__(self, table: str, column: str | None, sample_id: str | None, reason: str) -> None:
        self.table = table
        self.column = column
        self.sample_id = sample_id
        self.reason = reason
        where = f"{table}.{column}" if column else table
        who = f" (sample {sample_id})" if sample_id is not None else ""
        super().__init__(f"{where}{who}: {reason}; nothing was written")


class LakeSchemaVersionError(LakeError):
    """A table was written by a VRP with another schema version.

    An older version is upgraded in place by ``vrp lake migrate``; a newer one needs a newer VRP.
    """

    def __init__(
        self, table: str, path: str, found: str | None, expected: int, root: str | None = None
    ) -> None:
        self.table, self.path, self.found, self.expected = table, path, found, expected
        found_text = f"schema version {found}" if found is not None else "no VRP schema version"
        if found is not None and found.isdigit() and int(found) < expected:
            lake = f" --lake {root}" if root else ""
            advice = (
                f"Upgrade the lake in place with `vrp lake migrate{lake}` (it adds the new columns, "
                "empty for existing rows), or write to a new lake (--lake DIR or $VRP_LAKE)."
            )
        else:
            advice = (
                "Write to a new lake (--lake DIR or $VRP_LAKE), or read this one with a VRP release whose "
                f"schema version is {found if found is not None else 'the one that wrote it'}."
            )
        super().__init__(
            f"lake table '{table}' at {path} has {found_text}, but this VRP uses schema version {expected}. "
            + advice
        )


class LakeLogError(LakeError):
    """A table whose Delta log cannot be read (a commit file damaged, truncated or deleted).

    The table cannot be read or written until the named log file is restored; the other tables
    of the lake still can.
    """

    def __init__(self, table: str, log_file: str, problem: str) -> None:
        self.table, self.log_file, self.problem = table, log_file, problem
        super().__init__(
            f"lake table '{table}' has a damaged Delta log: {log_file}: {problem}. Restore that file "
            f"from a backup or copy of the lake; until then '{table}' cannot be read or written (the "
            "other tables can; `vrp lake check` lists what is damaged)"
        )


class DamagedFileError(LakeError):
    """A committed Parquet file of the lake that does not read (truncated, overwritten, missing)."""


# the data files delta-rs writes (part-...parquet) and the log's checkpoints, not any .parquet a
# user names (vrp query --out x.parquet)
_PARQUET_PATH = re.compile(r"""['"]?([^\s'"]*(?:part-[^\s'"/]*|\.checkpoint[^\s'"/]*)\.parquet)['"]?""")
_TABLE_OF_STREAM = re.compile(r"registered as '([A-Za-z_]+)'")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def damaged_file_error(exc: BaseException) -> DamagedFileError | None:
    """The one-line error for a failure caused by a damaged lake Parquet file, else None.

    Every engine reports such a file differently (pyarrow, DuckDB over Arrow, Polars, deltalake),
    but each names the file, so every reading command gets the same message from this one place.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = _ANSI.sub("", str(current))
        match = _PARQUET_PATH.search(text)
        if match:
            table = _TABLE_OF_STREAM.search(text)
            where = f"lake table '{table.group(1)}': " if table else ""
            reason = " ".join(text[match.end() :].replace("':", "").split()).strip(": ")
            reason = re.split(r"(?<=[a-z])\. ", reason, maxsplit=1)[0].rstrip(".")[:160]
            return DamagedFileError(
                f"{where}damaged file {match.group(1)} ({reason or 'cannot be read'}): run `vrp lake check` "
                "to list damaged files, then `vrp lake repair` to remove them (their samples are "
                "ingested again by the next `vrp ingest run`)"
            )
        current = current.__cause__ or current.__context__
    return None
