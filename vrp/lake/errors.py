"""Exceptions raised by the lake, each saying what is wrong and what to do about it."""

from __future__ import annotations


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
