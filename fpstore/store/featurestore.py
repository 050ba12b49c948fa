"""FeatureStore: DuckDB views over the store's Parquet files, and fast vector reads.

``fpstore.store.open(path)`` returns a :class:`FeatureStore`. Its views (all read lazily from
the files, nothing is copied in):

    fingerprints  encoder, cohort, patch keys and coordinates, fingerprint FLOAT[dim]
                  (FLOAT[] when encoders of several dimensions share the store)
    fingerprints_<dim>  the same for the encoders of one dimension, FLOAT[dim] (e.g.
                  fingerprints_512, fingerprints_2560): array functions work there
    patches       one row per patch (any encoder): cohort, keys, coordinates, tissue fraction
    slides        cohort slides joined with the extraction status (one row per slide and encoder)
    labels        cohort, patient_id, marker, status, raw_value, site
    tissue        cohort, slide_id, patch_id, tissue_type, class probabilities, method
    predictions   classifier outputs per patient (runs/<run_id>/patients.parquet)
    patch_predictions   classifier outputs per patch (runs/<run_id>/patches.parquet)
    patch_attention     an attention head's weight per patch (runs/<run_id>/attention.parquet)

Queries come back as lazy :class:`Query` objects (``.to_arrow()``, ``.to_numpy()``). Other
modules use the parameterised helpers (``table``, ``fingerprints``, ``mean_fingerprints``),
never SQL built from user strings. Vectors for training are read with pyarrow straight into
one ``(N, dim)`` float32 matrix: DuckDB is for selection, SQL and ad-hoc pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fpstore.errors import StoreError
from fpstore.store.cohorts import cohort_names
from fpstore.store.fingerprints import partition_settings
from fpstore.store.layout import (
    STATUS_FILES,
    TISSUE_FILES,
    StoreLayout,
    partitions,
    visible_files,
)
from fpstore.store.pooling import segment_mean
from fpstore.store.remote import register_with_duckdb
from fpstore.store.schema import (
    KEY_COLUMNS,
    LABELS,
    PATCH_ATTENTION,
    PATCH_KEY_FIELDS,
    PATCH_PREDICTIONS,
    PATIENT_PREDICTIONS,
    SLIDES,
    TISSUE,
    fingerprint_schema,
    read_metadata,
)
from fpstore.store.sql import SqlLimits, apply_limits, check_read_only, stream_rows

STATUS_COLUMNS = {
    "slide_id": "VARCHAR",
    "status": "VARCHAR",
    "error": "VARCHAR",
    "n_patches": "BIGINT",
    "seconds": "DOUBLE",
    "finished_at": "VARCHAR",
}
VIEWS = (
    "fingerprints",
    "patches",
    "slides",
    "labels",
    "tissue",
    "predictions",
    "patch_predictions",
    "patch_attention",
)


def _literal(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _file_list(paths) -> str:
    return "[" + ", ".join(_literal(p) for p in paths) + "]"


@dataclass
class Query:
    """A SQL query over the store, run when its result is asked for."""

    store: FeatureStore
    text: str
    params: list | None = None

    def relation(self):
        """The DuckDB relation (lazy): chain ``.filter()``, ``.aggregate()``, ``.limit()``..."""
        import duckdb

        try:
            return self.store.connection.sql(self.text, params=self.params or None)
        except duckdb.Error as error:
            raise StoreError(f"query failed: {error}\n  query: {self.text}") from error

    def to_arrow(self) -> pa.Table:
        import duckdb

        relation = self.relation()
        if relation is None:  # a statement without a result (CREATE, SET, ...)
            return pa.table({})
        try:
            return relation.to_arrow_table()
        except duckdb.Error as error:
            raise StoreError(f"query failed: {error}\n  query: {self.text}") from error

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Columns as numpy arrays; a FLOAT[dim] column becomes one (N, dim) float32 matrix."""
        table = self.to_arrow()
        return {name: column_to_numpy(table.column(name)) for name in table.column_names}

    def to_pandas(self):
        return self.to_arrow().to_pandas()

    def rows(self) -> list[dict]:
        return self.to_arrow().to_pylist()


def column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column -> (N, dim) matrix (one copy at most); others -> 1-D."""
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        if column.num_chunks == 0 or len(column) == 0:
            return np.zeros((0, dim), np.float32)
        parts = [
            chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            for chunk in column.chunks
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return column.to_numpy(zero_copy_only=False)


@dataclass
class Fingerprints:
    """Patch keys (pyarrow table, KEY_COLUMNS + cohort) and their vectors (N, dim) float32."""

    keys: pa.Table
    vectors: np.ndarray
    encoder: str
    metadata: dict

    def __len__(self) -> int:
        return len(self.vectors)


class FeatureStore:
    """A store folder seen through DuckDB views; see the module docstring."""

    def __init__(self, path: str | Path, read_only: bool = False, limits: SqlLimits | None = None):
        import duckdb

        self.layout = StoreLayout.of(path)
        self.path = self.layout.root  # a Path, or a RemotePath for s3://... (store.remote)
        if not self.path.is_dir():
            raise StoreError(
                f"store {str(self.path)!r} does not exist; create it with "
                "`fpstore cohort add --store DIR ...` or pass --store"
            )
        self.connection = duckdb.connect()
        register_with_duckdb(self.connection, self.path)
        self.dims: dict[str, int] = {}
        self._dim_views: set[int] = set()  # the fingerprints_<dim> views made
        self.settings: dict[tuple[str, str], dict] = {}  # (encoder, cohort) -> their settings
        self.refresh()
        self.read_only = read_only
        self.limits = limits or SqlLimits.for_machine()
        self._temp_dir: str | None = None
        if read_only:
            self._lock_down()

    def _lock_down(self) -> None:
        """DuckDB may read the store's own files and nothing else, within the limits, and its
        settings stay so (``fpstore sql``: a query tool over a store reads the store only).
        DuckDB always allows its temporary folder (by default ./.tmp, whatever it holds), so
        it gets a private empty one of its own."""
        import tempfile

        root = str(self.path)
        if isinstance(self.path, Path):
            root = str(self.path.resolve())
        root = root.rstrip("/") + "/"
        self._temp_dir = tempfile.mkdtemp(prefix="fpstore-sql-")
        apply_limits(self.connection, self.limits, self._temp_dir)
        self.connection.execute("SET allowed_directories = [?]", [root])
        self.connection.execute("SET enable_external_access = false")
        self.connection.execute("SET lock_configuration = true")

    def close(self) -> None:
        import shutil

        self.connection.close()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- views --
    def refresh(self) -> None:
        """(Re)build the views: files written since the store was opened become visible."""
        self._fingerprint_views()
        self._cohort_views()
        self._parquet_view("tissue", self.layout.tissue_root, TISSUE_FILES, TISSUE, hive=True)
        self._parquet_view(
            "predictions", self.layout.runs_dir, "*/patients.parquet", PATIENT_PREDICTIONS
        )
        self._parquet_view(
            "patch_predictions", self.layout.runs_dir, "*/patches.parquet", PATCH_PREDICTIONS
        )
        self._parquet_view(
            "patch_attention", self.layout.runs_dir, "*/attention.parquet", PATCH_ATTENTION
        )

    def _view(self, name: str, select: str) -> None:
        self.connection.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")

    def _empty(self, name: str, schema: pa.Schema) -> None:
        self.connection.register(f"_empty_{name}", schema.empty_table())
        self._view(name, f"SELECT * FROM _empty_{name}")

    def _fingerprint_views(self) -> None:
        encoders = partitions(self.layout.fingerprints_dir, "encoder")
        selects, self.dims = [], {}
        for encoder, folder in encoders.items():
            files = [f for c in partitions(folder, "cohort").values() for f in visible_files(c)]
            if not files:
                continue
            for cohort in partitions(folder, "cohort"):  # the views never mix settings
                self.settings[(encoder, cohort)] = partition_settings(self.layout, encoder, cohort)
            self.dims[encoder] = pq.read_schema(files[0]).field("fingerprint").type.list_size
            selects.append((encoder, f"{folder}/cohort=*/*.parquet"))
        keys = ", ".join(KEY_COLUMNS)
        if not selects:
            empty = fingerprint_schema(512)
            extra = [pa.field("encoder", pa.string()), pa.field("cohort", pa.string())]
            self._empty("fingerprints", pa.schema(extra + list(empty)))
            self._view("patches", f"SELECT DISTINCT cohort, {keys} FROM fingerprints")
            return
        # One FLOAT[dim] type is needed for array_cosine_similarity; encoders of other
        # dimensions can only share a view as variable-length FLOAT[] lists (list_ functions),
        # so each dimension also has its own view, fingerprints_<dim>, typed FLOAT[dim].
        dims = sorted(set(self.dims.values()))
        vector = f"FLOAT[{dims[0]}]" if len(dims) == 1 else "FLOAT[]"

        def union(vector_type: str, wanted) -> str:
            return " UNION ALL ".join(
                f"SELECT {_literal(e)} AS encoder, cohort, {keys}, "
                f"fingerprint::{vector_type} AS fingerprint "
                f"FROM read_parquet({_literal(glob)}, hive_partitioning = true)"
                for e, glob in selects
                if self.dims[e] in wanted
            )

        self._view("fingerprints", union(vector, dims))
        for dim in dims:
            self._view(f"fingerprints_{dim}", union(f"FLOAT[{dim}]", (dim,)))
        for gone in self._dim_views - set(dims):  # a dimension whose files were removed
            self.connection.execute(f"DROP VIEW IF EXISTS fingerprints_{gone}")
        self._dim_views = set(dims)
        # Coordinates are shared by every encoder: a patch is one row whatever encoded it.
        self._view(
            "patches",
            " UNION ".join(
                f"SELECT cohort, {keys} FROM read_parquet({_literal(glob)}, hive_partitioning = true)"
                for _, glob in selects
            ),
        )

    def _cohort_views(self) -> None:
        cohorts = {name: self.layout.cohort_dir(name) for name in cohort_names(self.layout)}
        for name, schema in (("cohort_slides", SLIDES), ("labels", LABELS)):
            files = [p / f"{name.removeprefix('cohort_')}.parquet" for p in cohorts.values()]
            if not files:
                self._empty(name, pa.schema([pa.field("cohort", pa.string())] + list(schema)))
                continue
            self._view(
                name,
                " UNION ALL ".join(
                    f"SELECT {_literal(c)} AS cohort, * FROM read_parquet({_literal(f)})"
                    for c, f in zip(cohorts, files)
                ),
            )
        status_files = list(self.layout.status_root.glob(STATUS_FILES))
        if status_files:
            columns = (
                "{"
                + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in STATUS_COLUMNS.items())
                + "}"
            )
            self._view(
                "extraction_status",
                (
                    f"SELECT * FROM read_json({_literal(self.layout.status_root / STATUS_FILES)}, "
                    f"columns = {columns}, hive_partitioning = true, format = 'auto')"
                ),
            )
        else:
            fields = [
                pa.field(k, pa.string())
                for k in ("encoder", "cohort", "slide_id", "status", "error", "finished_at")
            ]
            fields += [pa.field("n_patches", pa.int64()), pa.field("seconds", pa.float64())]
            self._empty("extraction_status", pa.schema(fields))
        self._view(
            "slides",
            (
                "SELECT s.*, x.encoder, x.status, x.error, x.n_patches, x.seconds, x.finished_at "
                "FROM cohort_slides s LEFT JOIN extraction_status x "
                "ON s.cohort = x.cohort AND s.slide_id = x.slide_id"
            ),
        )

    def _parquet_view(self, name, folder, pattern: str, schema: pa.Schema, hive=False) -> None:
        files = visible_files(folder, pattern) if folder.is_dir() else []
        if not files:
            fields = ([pa.field("cohort", pa.string())] if hive else []) + list(schema)
            self._empty(name, pa.schema(fields))
            return
        self._view(
            name,
            f"SELECT * FROM read_parquet({_file_list(files)}, "
            f"hive_partitioning = {str(hive).lower()})",
        )

    # -- queries --
    def sql(self, text: str, params: list | None = None) -> Query:
        """A lazy query over the views (for users and the CLI). On a read-only store only
        SELECT (and EXPLAIN) statements run: no COPY, ATTACH, INSTALL/LOAD, SET or writes."""
        if self.read_only:
            check_read_only(text)
        return Query(self, text, params)

    def stream(self, text: str):
        """(column names, rows) batch by batch from DuckDB's streaming result, stopped at the
        store's time limit; on a read-only store only reading statements run."""
        if self.read_only:
            check_read_only(text)
        return stream_rows(self.connection, text, self.limits)

    def columns(self, view: str) -> list[str]:
        if view not in VIEWS:
            raise StoreError(f"no view {view!r}; views: {', '.join(VIEWS)}")
        return [row[0] for row in self.connection.execute(f"DESCRIBE {view}").fetchall()]

    def table(self, view: str, columns: list[str] | None = None, **equals) -> Query:
        """``SELECT columns FROM view WHERE col = value AND col IN (list) ...``, parameterised.

        Column names are checked against the view, values are bound, so callers never
        build SQL from strings they were given.
        """
        known = self.columns(view)
        bad = [c for c in list(columns or []) + list(equals) if c not in known]
        if bad:
            raise StoreError(f"view {view!r} has no column {bad[0]!r}; columns: {', '.join(known)}")
        where, params = [], []
        for column, value in equals.items():
            if isinstance(value, (list, tuple, set, np.ndarray)):
                values = list(value)
                where.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "false")
                params += values
            else:
                where.append(f"{column} = ?")
                params.append(value)
        select = ", ".join(columns) if columns else "*"
        text = f"SELECT {select} FROM {view}" + (f" WHERE {' AND '.join(where)}" if where else "")
        return Query(self, text, params)

    # -- vectors --
    def encoders(self) -> list[dict]:
        """The encoders with fingerprints in the store: id, dim, cohorts, files, metadata."""
        rows = []
        for encoder, folder in partitions(self.layout.fingerprints_dir, "encoder").items():
            cohorts = {c: visible_files(f) for c, f in partitions(folder, "cohort").items()}
            files = [f for fs in cohorts.values() for f in fs]
            if not files:
                continue
            schema = pq.read_schema(files[0])
            rows.append(
                {
                    "encoder": encoder,
                    "dim": schema.field("fingerprint").type.list_size,
                    "cohorts": sorted(c for c, fs in cohorts.items() if fs),
                    "files": len(files),
                    "metadata": read_metadata(schema),
                }
            )
        return rows

    def fingerprint_files(
        self, encoder: str, cohort: str | None = None, slide_ids=None
    ) -> list[tuple[str, Path]]:
        """(cohort, file) of every slide's fingerprints for ``encoder`` (and cohort, slides).

        Each cohort's files must share one set of extraction settings
        (``partition_settings``): a mixed, corrupt or stale partition is refused, not read.
        """
        folder = self.layout.fingerprints_dir / f"encoder={encoder}"
        if not folder.is_dir():
            known = [row["encoder"] for row in self.encoders()]
            raise StoreError(
                f"no fingerprints for encoder {encoder!r} in {str(self.path)!r}; "
                f"encoders with fingerprints: {', '.join(known) or 'none, run `fpstore extract`'}"
            )
        wanted = None if slide_ids is None else set(slide_ids)
        out = []
        for name, sub in partitions(folder, "cohort").items():
            if cohort is not None and name != cohort:
                continue
            self.settings[(encoder, name)] = partition_settings(self.layout, encoder, name)
            out += [(name, f) for f in visible_files(sub) if wanted is None or f.stem in wanted]
        return out

    def fingerprints(self, encoder: str, cohort: str | None = None, slide_ids=None) -> Fingerprints:
        """Keys and an (N, dim) float32 matrix of ``encoder``'s fingerprints, read with pyarrow;
        ``metadata`` holds the extraction settings they share (one cohort) ."""
        files = self.fingerprint_files(encoder, cohort, slide_ids)
        keys, vectors = [], []
        for name, path in files:
            table = pq.read_table(path)
            vectors.append(column_to_numpy(table.column("fingerprint")))
            k = table.select(KEY_COLUMNS)
            keys.append(k.append_column("cohort", pa.array([name] * len(k), pa.string())))
        dim = self.dims.get(encoder, 512)
        schema = pa.schema(list(PATCH_KEY_FIELDS) + [pa.field("cohort", pa.string())])
        cohorts = sorted({name for name, _ in files})
        metadata = self.settings.get((encoder, cohorts[0]), {}) if len(cohorts) == 1 else {}
        return Fingerprints(
            keys=pa.concat_tables(keys) if keys else schema.empty_table(),
            vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
            encoder=encoder,
            metadata=metadata,
        )

    def mean_fingerprints(
        self,
        encoder: str,
        cohort: str | None = None,
        by: str = "patient_id",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (G, dim) means) pooled over ``by`` (patient_id or slide_id).

        numpy over the pyarrow matrix: a segment sum, several times faster than any SQL
        form DuckDB offers for element-wise means of arrays (see benchmarks/bench_duckdb.py).
        ``fpstore.store.similarity.vector_index(store, encoder).pooled_means(by)`` pools the
        memory-mapped matrix that ``fpstore similar`` keeps under ``cache/`` instead (built on
        first use, rebuilt when the files change): no Parquet decoding: 0.8 s per million
        patches on 2 cores once it exists (35 s to build).
        """
        if by not in ("patient_id", "slide_id"):
            raise StoreError(f"mean_fingerprints by={by!r}; use 'patient_id' or 'slide_id'")
        fp = self.fingerprints(encoder, cohort)
        ids, index = np.unique(
            fp.keys.column(by).to_numpy(zero_copy_only=False).astype(str), return_inverse=True
        )
        return ids, segment_mean(fp.vectors, index, len(ids))


def open(  # noqa: A001
    path: str | Path, read_only: bool = False, limits: SqlLimits | None = None
) -> FeatureStore:
    """Open a store folder: ``fpstore.store.open("fpstore-store").sql("SELECT ...")``;
    ``read_only`` (what ``fpstore sql`` uses): DuckDB reads the store's files and nothing else,
    within ``limits`` (default: :meth:`SqlLimits.for_machine`)."""
    return FeatureStore(path, read_only, limits)
