"""``fpstore sql``'s guard: statements that only read, and bounds on memory, threads, temporary
space and time, so that one query can neither change the store nor take the machine down.

The statement check parses (``duckdb.extract_statements``) and looks inside EXPLAIN, because
``EXPLAIN ANALYZE`` runs the statement it wraps: ``EXPLAIN ANALYZE COPY ... TO 'store/...'``
would otherwise replace a fingerprint file. Rows come back in Arrow batches from DuckDB's
streaming result, so the output of a large query is never held whole.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from fpstore.errors import ConfigError, StoreError

DEFAULT_TIMEOUT_S = 300.0
BATCH_ROWS = 2048  # rows of fingerprints are ~16 kB as Python lists
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_MIN_MEMORY = 16 * 2**20  # below this DuckDB cannot run even a small scan


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '2000000' -> bytes; ConfigError naming the value otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"memory limit {text!r} is not a size; write e.g. 8GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class SqlLimits:
    """What one query may use. ``for_machine()`` gives the defaults: a quarter of the RAM, half
    the cores, temporary (spill) space twice the memory limit, 300 s."""

    memory_bytes: int
    threads: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        if not self.memory_bytes >= _MIN_MEMORY:
            raise ConfigError(
                f"memory limit {self.memory_bytes} bytes is below 16 MiB; give e.g. 1GB"
            )
        if self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be at least 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout {self.timeout_s} s must be above 0")

    @property
    def temp_bytes(self) -> int:
        return 2 * self.memory_bytes

    @classmethod
    def for_machine(
        cls,
        memory: str | None = None,
        threads: int | None = None,
        timeout_s: float | None = None,
    ) -> SqlLimits:
        return cls(
            memory_bytes=parse_size(memory) if memory else machine_memory() // 4,
            threads=threads or max(1, machine_cores() // 2),
            timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        )


def apply_limits(connection, limits: SqlLimits, temp_dir: str) -> None:
    """Bound a DuckDB connection (before its configuration is locked)."""
    connection.execute("SET temp_directory = ?", [temp_dir])
    connection.execute("SET memory_limit = ?", [f"{limits.memory_bytes}B"])
    connection.execute("SET max_temp_directory_size = ?", [f"{limits.temp_bytes}B"])
    connection.execute(f"SET threads = {int(limits.threads)}")
    connection.execute("SET enable_progress_bar = false")  # it would print into the output


_REFUSED = (
    "{kind} statements are not allowed: `fpstore sql` only reads the store "
    "(SELECT, EXPLAIN without ANALYZE, DESCRIBE, SHOW); save results with --format csv > out.csv"
)


def check_read_only(text: str) -> None:
    """StoreError unless every statement of ``text`` is a SELECT (DESCRIBE, SHOW, SUMMARIZE and
    FROM-first parse as SELECT) or an EXPLAIN, without ANALYZE, of a SELECT."""
    for statement in _statements(text, text):
        kind = statement.type.name
        if kind == "EXPLAIN":
            _check_explain(statement.query, text)
        elif kind != "SELECT":
            raise StoreError(_REFUSED.format(kind=kind))


def _statements(text: str, query: str):
    import duckdb

    try:
        return duckdb.extract_statements(text)
    except duckdb.Error as error:
        raise StoreError(f"query failed: {_one_line(error)}; query: {query}") from error


def _check_explain(text: str, query: str) -> None:
    """EXPLAIN [ANALYZE | (options)] <statement>: ANALYZE runs the statement, so it is refused;
    what EXPLAIN wraps must itself be a SELECT."""
    import duckdb

    tokens = duckdb.tokenize(text)  # (offset, type); comments are not tokens
    if len(tokens) < 2:
        raise StoreError(_REFUSED.format(kind="EXPLAIN"))
    start, options = tokens[1][0], ""
    if text[start:].upper().startswith(("ANALYZE", "ANALYSE")):
        raise StoreError(_REFUSED.format(kind="EXPLAIN ANALYZE"))
    if text[start] == "(":
        depth = 0
        for offset, _ in tokens[1:]:
            depth += {"(": 1, ")": -1}.get(text[offset], 0)
            if depth == 0:
                options, start = text[tokens[1][0] : offset + 1], offset + 1
                break
        if re.search(r"\banaly[sz]e\b", options, re.IGNORECASE):
            raise StoreError(_REFUSED.format(kind="EXPLAIN (ANALYZE)"))
    inner = _statements(text[start:], query)
    if len(inner) != 1 or inner[0].type.name != "SELECT":
        kind = inner[0].type.name if inner else "empty"
        raise StoreError(_REFUSED.format(kind=f"EXPLAIN of {kind}"))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def stream_rows(connection, text: str, limits: SqlLimits) -> Iterator[tuple[list[str], list]]:
    """Run ``text`` and yield (column names, rows as dicts) batch by batch, interrupting the
    query when ``limits.timeout_s`` has passed since the start, output included."""
    import duckdb

    expired = threading.Event()

    def stop() -> None:
        expired.set()
        connection.interrupt()

    timer = threading.Timer(limits.timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        try:
            reader = connection.sql(text).to_arrow_reader(BATCH_ROWS)
            names = reader.schema.names
            for batch in reader:
                yield names, batch.to_pylist()
        except (duckdb.Error, OSError) as error:  # pyarrow's reader re-raises as OSError
            raise _query_error(error, text, limits, expired.is_set()) from error
    finally:
        timer.cancel()


def _query_error(error, text: str, limits: SqlLimits, expired: bool) -> StoreError:
    import duckdb

    message = _one_line(error)
    if expired:
        return StoreError(
            f"query stopped after its time limit of {limits.timeout_s:g} s; "
            "narrow it (WHERE, LIMIT) or raise --timeout"
        )
    if isinstance(error, duckdb.OutOfMemoryException) or "Out of Memory" in message:
        first = message.split(". ")[0]  # DuckDB's advice that follows is about SET, refused here
        return StoreError(
            f"query needs more than its memory limit of {limits.memory_bytes / 1e6:.0f} MB "
            f"(and {limits.temp_bytes / 1e6:.0f} MB of temporary space): {first}; "
            "narrow it (WHERE, LIMIT, fewer joins) or raise --memory-limit"
        )
    return StoreError(f"query failed: {message}; query: {' '.join(text.split())}")
