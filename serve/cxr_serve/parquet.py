"""``cxr-infer --format parquet``: the JSON Lines records as an Apache Parquet table, for archives
scored on a Ray cluster and read back with pandas, Polars, Spark or DuckDB.

One row per input with the columns of the JSON Lines record (``probabilities`` a struct of the
model's labels, ``domain_reasons`` a list) and ``error`` (null for a classified input). The rows
are the JSON Lines writer's own records, so the two formats hold the same values. The table is
written when the run ends; give it a file (``--output FILE``). Needs pyarrow (``pip install
'cxr[ray]'``); the format is offered through the ``cxr.formats`` entry point group.

Examples:
    $ cxr-infer scans/ --format parquet --output scans.parquet
"""
from __future__ import annotations

import importlib.util
import io
import json
from typing import Any, Dict, List, Optional, Sequence

from cxr_infer.errors import CXRError
from cxr_infer.formats import FormatContext, JsonLinesWriter, OutputFormat, ResultWriter

COLUMNS = ("path", "label", "probability", "threshold", "probabilities", "in_domain", "domain_score",
           "domain_reasons", "error")


class ParquetError(CXRError):
    """The table cannot be written where asked."""


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ParquetError("--format parquet needs pyarrow: pip install 'cxr[ray]'") from None
    return pyarrow


def schema(labels: Sequence[str]) -> Any:
    """The table's schema for a model with ``labels``."""
    pa = _pyarrow()
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("probability", pa.float64()),
                      ("threshold", pa.float64()),
                      ("probabilities", pa.struct([(label, pa.float64()) for label in labels])),
                      ("in_domain", pa.bool_()), ("domain_score", pa.float64()),
                      ("domain_reasons", pa.list_(pa.string())), ("error", pa.string())])


class ParquetWriter(ResultWriter):
    """Collects each input's JSON Lines record and writes the table on :meth:`close`."""

    def __init__(self, context: FormatContext) -> None:
        super().__init__(context)
        _pyarrow()
        if getattr(self.out, "isatty", lambda: False)():
            raise ParquetError("--format parquet writes a binary table: give it a file (--output FILE)")
        self.rows: List[Dict[str, Any]] = []
        clf = context.classifier
        self.labels: Optional[List[str]] = list(clf.spec.labels) if clf is not None else None

    def _record(self, write: Any, *args: Any) -> Dict[str, Any]:
        buffer = io.StringIO()
        write(JsonLinesWriter(FormatContext(out=buffer)), *args)
        return json.loads(buffer.getvalue())

    def result(self, path: str, prediction: Any) -> None:
        row = self._record(JsonLinesWriter.result, path, prediction)
        self.labels = self.labels or list(row["probabilities"])
        self.rows.append(row)

    def error(self, path: str, message: str) -> None:
        self.rows.append(self._record(JsonLinesWriter.error, path, message))

    def close(self) -> None:
        pa = _pyarrow()
        rows = [{c: row.get(c) for c in COLUMNS} for row in self.rows]
        table = pa.Table.from_pylist(rows, schema=schema(self.labels or []))
        binary = getattr(self.out, "buffer", None)
        if binary is None:
            raise ParquetError("--format parquet writes a binary table: give it a file (--output FILE)")
        self.out.flush()
        pa.parquet.write_table(table, binary)
        binary.flush()


def _missing() -> Optional[str]:
    return None if importlib.util.find_spec("pyarrow") is not None else "needs pyarrow: pip install 'cxr[ray]'"


PARQUET_FORMAT = OutputFormat(
    "parquet", "an Apache Parquet table of the jsonl records, plus an error column (needs --output FILE and "
               "pyarrow: pip install 'cxr[ray]')", ParquetWriter, missing=_missing)
