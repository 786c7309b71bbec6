"""Read-only SQL for `vrp query`: one SELECT/EXPLAIN statement on a locked-down DuckDB connection.

Two fences, because either alone has holes (docs/ARCHITECTURE.md section 7): DuckDB's own
parser classifies the input, so ``SELECT 1; DROP ...`` shows up as two statements and COPY,
ATTACH, INSTALL/LOAD, SET, PRAGMA and CALL are refused by type, and an EXPLAIN is accepted only
around a SELECT (``EXPLAIN ANALYZE`` runs the statement it wraps, so ``EXPLAIN ANALYZE COPY ...
TO`` would write a file); and the connection runs with external access disabled and its
configuration locked, so a SELECT cannot read files such as ``read_csv('/etc/passwd')`` either.
DuckDB keeps its temp directory readable and writable even with external access off, so each
query gets its own fresh, empty one, removed afterwards. The lake itself is read through Arrow
views, which need no file access from DuckDB.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import duckdb
import pyarrow as pa

from vrp.lake.errors import LakeError, damaged_file_error
from vrp.lake.lake import Lake

T = TypeVar("T")

ALLOWED = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)

QUERIES_DIR = Path(__file__).resolve().parent.parent / "queries"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# "EXPLAIN [ANALYZE] [(options)]" at the start of a statement, after comments and white space.
_EXPLAIN_PREFIX = re.compile(
    r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN\s+(?:ANALY[SZ]E\b\s*)?(?:\([^()]*\)\s*)?",
    re.IGNORECASE | re.DOTALL,
)


class QueryRejected(LakeError):
    """User SQL that `vrp query` refuses to run (the message says why, on one line)."""


def one_line(message: str) -> str:
    """The first non-empty line of an error message."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return str(message).strip()


def check_query(sql: str) -> None:
    """Raise QueryRejected unless `sql` is exactly one SELECT or EXPLAIN statement."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRejected(f"rejected: the SQL does not parse: {one_line(str(exc))}") from exc
    if not statements:
        raise QueryRejected("rejected: no SQL statement given")
    if len(statements) > 1:
        kinds = ", ".join(s.type.name for s in statements)
        raise QueryRejected(
            f"rejected: {len(statements)} statements ({kinds}); vrp query runs exactly one SELECT or EXPLAIN"
        )
    kind = statements[0].type
    if kind not in ALLOWED:
        raise QueryRejected(
            f"rejected: {kind.name} statements are not allowed; "
            "vrp query is read-only and runs only SELECT or EXPLAIN"
        )
    if kind == duckdb.StatementType.EXPLAIN:
        _check_explained(statements[0].query)


def _check_explained(sql: str) -> None:
    """Raise QueryRejected unless the EXPLAIN statement `sql` wraps exactly one SELECT."""
    match = _EXPLAIN_PREFIX.match(sql)
    inner = sql[match.end() :] if match else ""
    try:
        statements = duckdb.extract_statements(inner) if inner.strip() else []
    except duckdb.Error:
        statements = []
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        what = statements[0].type.name if len(statements) == 1 else "something that is not one SELECT"
        raise QueryRejected(
            f"rejected: EXPLAIN of {what}; vrp query explains only a SELECT (EXPLAIN ANALYZE runs it)"
        )


#: Seconds an interrupted statement gets to stop before `vrp query` stops waiting for it.
_GRACE_S = 2.0


@overload
def run_query(lake: Lake, sql: str, *, timeout: float | None = None) -> pa.Table: ...


@overload
def run_query(
    lake: Lake, sql: str, *, timeout: float | None = None, render: Callable[[pa.Table], T]
) -> T: ...


def run_query(
    lake: Lake, sql: str, *, timeout: float | None = None, render: Callable[[pa.Table], Any] | None = None
) -> Any:
    """Check and run one read-only statement over the lake's views; errors come back on one line.

    With ``timeout`` (seconds) the statement is interrupted when it runs longer, so a runaway
    join in a scheduled report or a shared notebook ends with an error instead of holding the
    machine; nothing is written either way. The statement runs in a worker thread while this
    one waits: Ctrl-C (which DuckDB does not see while it computes) and the deadline both
    interrupt the connection. ``render`` (e.g. the result as CSV text) runs in that thread too,
    so the deadline covers the conversion of a large result, not only the statement.
    """
    check_query(sql)
    for name in _table_names(sql):
        if name in lake.broken:
            raise lake.broken[name]
    scratch = tempfile.TemporaryDirectory(prefix="vrp-query-")
    con = lake.connect(safe=True, temp_directory=scratch.name)
    outcome: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by Ctrl-C can report a live thread as ended
    finished = threading.Event()

    def work() -> None:
        try:
            table = con.sql(sql).to_arrow_table()
            outcome["table"] = table if render is None else render(table)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="vrp-query", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    cancelled = None
    try:
        worker.start()
        try:
            while not finished.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    cancelled = (
                        f"query cancelled after {timeout:g} s (--timeout): filter on run_id/model first, "
                        "select fewer columns, or allow more time"
                    )
                    break
                finished.wait(0.1 if left is None else min(0.1, left))
        except KeyboardInterrupt:
            cancelled = "query cancelled (Ctrl-C); nothing was written"
        if cancelled is not None:
            con.interrupt()
            finished.wait(_GRACE_S)
            raise LakeError(cancelled)
        error = outcome.get("error")
        if error is None:
            return outcome["table"]
        if isinstance(error, duckdb.InterruptException):
            raise LakeError("query cancelled; nothing was written") from error
        if not isinstance(error, duckdb.Error | pa.ArrowException | OSError) or (
            render is not None and not isinstance(error, duckdb.Error)
        ):
            raise error  # includes the rendering's own errors (e.g. --out in a missing folder)
        damaged = damaged_file_error(error)
        if damaged is not None:
            raise damaged from error
        message = one_line(str(error))
        for name, broken in lake.broken.items():  # a broken table has no view: say why
            if re.search(rf"\b{name}\b", message):
                raise broken from error
        raise LakeError(message) from error
    finally:
        if finished.is_set():  # else it still holds the connection; it ends with the process
            con.close()
            scratch.cleanup()


def _table_names(sql: str) -> set[str]:
    """Names of the tables a statement reads (empty when DuckDB cannot tell)."""
    try:
        return {name.lower() for name in duckdb.get_table_names(sql, qualified=False)}
    except duckdb.Error:
        return set()


def named_query(name: str) -> str:
    """The SQL of ``vrp/queries/<name>.sql``."""
    if not _NAME.match(name):
        raise LakeError(f"bad query name {name!r}: use the file name without .sql (see vrp query --list)")
    path = QUERIES_DIR / f"{name.removesuffix('.sql')}.sql"
    if not path.is_file():
        raise LakeError(f"no named query {name!r} in {QUERIES_DIR} (see vrp query --list)")
    return path.read_text(encoding="utf-8")


def list_queries() -> list[tuple[str, str]]:
    """(name, first comment line) of every named query, sorted by name."""
    out = []
    for path in sorted(QUERIES_DIR.glob("*.sql")):
        title = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("--"):
                title = line.strip().lstrip("-").strip()
                break
        out.append((path.stem, title))
    return out
