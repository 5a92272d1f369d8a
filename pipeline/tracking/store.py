"""The local SQLite store: created whole or not at all, and a broken one set aside.

MLflow creates a SQLite store by creating its tables and then running some forty
alembic migrations in place, without a lock. Two jobs doing it at once crash, and a job
killed halfway leaves a file every later job fails on ("table ... already exists",
"duplicate column"), with nothing that repairs it. So a new store is created and
migrated under a temporary name and renamed into place, under a file lock: the store
either does not exist or is complete. A store MLflow cannot open because of its schema
(half migrated by an older version of this code, or by another tool) is migrated on a
copy that replaces it when that works; otherwise it is moved aside, with one line saying
where and how to get its runs back, and a new store takes its place.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

# MLflow's messages that mean the file is not a usable store (as opposed to busy or gone).
SCHEMA_TROUBLE = ("out-of-date database schema", "already exists", "duplicate column", "no such table",
                  "file is not a database", "can't locate revision")


def quiet_mlflow() -> None:
    """MLflow logs every failed SQL statement with its traceback before raising it: the raise is what we report."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def open_sqlite(db: Path):
    """An MlflowClient on the SQLite store `db`, created atomically (or repaired) under its lock."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.is_file() or db.stat().st_size == 0:
            _create(db)
            _dispose(db, forget=False)  # connections this process holds on a file deleted or emptied meanwhile
        try:  # MLflow checks the schema as it makes the client
            client = MlflowClient(f"sqlite:///{db}")
            client.search_experiments(max_results=1)
        except Exception as err:
            if not any(s in str(err).lower() for s in SCHEMA_TROUBLE):
                raise
            repair(db, str(err).strip().splitlines()[0])
            client = MlflowClient(f"sqlite:///{db}")
            client.search_experiments(max_results=1)
    return client


def _create(db: Path, source: Path | None = None) -> None:
    """A complete store at `db`: made (or migrated from a copy of `source`) under a temporary name, then renamed."""
    import shutil

    from mlflow.tracking import MlflowClient

    staging = db.with_name(f".{db.name}.new-{os.getpid()}")
    staging.unlink(missing_ok=True)
    try:
        if source is not None:
            shutil.copyfile(source, staging)
            _upgrade(staging)
        MlflowClient(f"sqlite:///{staging}").search_experiments(max_results=1)  # creates and migrates
        _dispose(staging)
        os.replace(staging, db)
    finally:
        staging.unlink(missing_ok=True)


def _upgrade(db: Path) -> None:
    """`mlflow db upgrade` on `db` (MLflow's own migrations, from the revision the file records)."""
    import sqlalchemy
    from mlflow.store.db.utils import _upgrade_db

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()


def _dispose(db: Path, forget: bool = True) -> None:
    """Close MLflow's cached engine on `db`, so no connection outlives a rename (forget: drop it from the cache)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engines = getattr(SqlAlchemyStore, "_engine_map", None) or {}
        engine = engines.pop(f"sqlite:///{db}", None) if forget else engines.get(f"sqlite:///{db}")
        if engine is not None:
            engine.dispose()
    except Exception:  # another MLflow: the connection is closed when the process ends
        pass


def repair(db: Path, reason: str) -> Path | None:
    """Migrate a store MLflow cannot open on a copy; if that fails too, move it aside and start a new one.

    Returns where the old store went (None when it was repaired in place).
    """
    try:
        _create(db, source=db)
        print(f"warning: the MLflow store {db} had an unfinished schema ({reason}); it was migrated and kept.",
              file=sys.stderr, flush=True)
        return None
    except Exception:  # half migrated: alembic cannot go on from where the killed job stopped
        pass
    aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = count_runs(db)
    _dispose(db)  # the failed open left an engine on the old file
    os.replace(db, aside)
    _create(db)
    held = f"it holds {runs} run(s): " if runs else "it holds no runs. "
    print(f"warning: the MLflow store {db} was left half-created ({reason}), probably by a job killed while "
          f"creating it; it was moved to {aside} and a new store created. {held}"
          + ("send them again from their run folders with python -m pipeline.tracking sync <run folders>."
             if runs else ""), file=sys.stderr, flush=True)
    return aside


def count_runs(db: Path) -> int:
    """Runs in a store MLflow cannot open (read with sqlite3 itself); 0 when it has no runs table."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("select count(*) from runs").fetchone()[0])
    except sqlite3.Error:
        return 0
