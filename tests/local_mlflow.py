"""Fresh MLflow SQLite stores for tests, each a copy of one store that MLflow itself created.

MLflow 3 builds a new SQLite store by running its schema migrations, 1-2 s of CPU on a 2-core
machine, and the suite opens about fifty fresh stores (every process that opens a new store
pays it again). A copy of a store MLflow has just created is the same empty store, written in
milliseconds: same schema, same ``alembic_version``, the ``Default`` experiment. Tests that
check what a run does with an absent store (a default ``tracking.uri``) do not use this.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

_template: Path | None = None


def _template_store() -> Path:
    """The store MLflow created, once per test process."""
    global _template
    if _template is None:
        from mlflow.tracking import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="distnoisy-mlflow-template-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates it
        _template = path
    return _template


def sqlite_uri(directory: Path, name: str = "mlflow.db") -> str:
    """``sqlite:///directory/name``: a new, empty MLflow store there (an existing file is kept).

    The copy is made with SQLite's backup API, so it is consistent even while this process holds
    the template open. The ``Default`` experiment's artifact location is moved next to the copy
    (``directory/mlruns/0``), where a store created there would keep it.
    """
    path = Path(directory) / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = sqlite3.connect(_template_store())
        target = sqlite3.connect(path)
        try:
            source.backup(target)
            with target:
                target.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    ((path.parent / "mlruns" / "0").as_posix(),),
                )
        finally:
            source.close()
            target.close()
    return f"sqlite:///{path}"
