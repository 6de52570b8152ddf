//! The embedded default store: SQLite in WAL mode, in a data directory, with nothing to install.
//!
//! One connection writes (the group-commit writer calls `apply`, one batch per transaction) and
//! one reads, so reads never wait behind a commit's fsync. `synchronous = FULL`: a committed
//! batch survives power loss, which is what an acknowledgement promises; group commit pays that
//! fsync once per batch instead of once per request.
//!
//! Workers are never deleted, only marked removed, so worker ids are never reused (a reused id
//! could inherit a departed worker's token or assignments).
//!
//! The data directory is private (0700, the database files 0600) and locked (`flock` on
//! `DIR/lock`) for the store's life: a second coordinator on it refuses to start, naming the
//! holder's process.
//!
//! The contract every backend honours (ordering and fencing by attempt, no-ops and conflicts,
//! atomic batches, what recovery returns) is on the [`Store`] trait; the SQL here implements it
//! with guarded `UPDATE`s (`… WHERE attempt < ?`) and `INSERT OR IGNORE` for attempt ends.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use crate::sync::Mutex;

use super::rules::{judge, Prior};
use super::{
    AttemptEnd, AttemptRecord, Change, IdKind, KeyRecord, ListFilter, Recovery, Role, Store,
    StoreError, TaskRecord, TaskState, TokenRecord, WorkerRecord,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id           INTEGER PRIMARY KEY,
    grp          TEXT    NOT NULL,
    tags         TEXT    NOT NULL,
    priority     INTEGER NOT NULL,
    payload      BLOB    NOT NULL,
    state        TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    worker       INTEGER,
    outcome      TEXT,
    submitted_ms INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks (state) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS workers (
    id         INTEGER PRIMARY KEY,
    groups     TEXT    NOT NULL,
    tags       TEXT    NOT NULL,
    token_hash TEXT    NOT NULL,
    removed    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (
    task     INTEGER NOT NULL,
    attempt  INTEGER NOT NULL,
    worker   INTEGER NOT NULL,
    ended    TEXT    NOT NULL,
    outcome  TEXT,
    ended_ms INTEGER NOT NULL,
    PRIMARY KEY (task, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    scope       INTEGER NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    ids         TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_age ON keys (created_ms);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    id         INTEGER PRIMARY KEY,
    hash       TEXT    NOT NULL UNIQUE,
    role       TEXT    NOT NULL,
    groups     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0
);
";

/// SQLite in WAL mode. See the module docs.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Dropped last: the connections close before another coordinator may open the store.
    _lock: DirLock,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, as `dir/switchyard.db`, and takes the
    /// directory's lock for as long as the store lives (see `DirLock`). The directory is
    /// made private to its owner (0700), and the database files are 0600.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| backend(format!("creating {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| backend(format!("making {} private: {e}", dir.display())))?;
        let lock = DirLock::acquire(dir)?;
        let path = dir.join("switchyard.db");
        // Created private before SQLite opens it; SQLite gives its -wal and -shm files the
        // database's permissions.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| backend(format!("creating {}: {e}", path.display())))?;
        let writer = Connection::open(&path).map_err(backend)?;
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(backend)?;
        writer.execute_batch(SCHEMA).map_err(backend)?;
        writer.set_prepared_statement_cache_capacity(64);
        let reader = Connection::open(&path).map_err(backend)?;
        reader.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            _lock: lock,
        })
    }
}

/// The exclusive lock on a data directory: one coordinator owns a store. An OS file lock on
/// `dir/lock` (`flock`), held while this value lives; the kernel drops it when the process
/// ends however it ends, so a SIGKILL never blocks the restart. The file names the holder
/// (its process id), so a second coordinator can say who is in the way.
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| backend(format!("opening {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    holder.to_string()
                };
                return Err(StoreError::Locked(format!(
                    "the data directory {} is in use by {holder}; stop it, or give this \
                     coordinator another --data-dir",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(backend(format!("locking {}: {e}", path.display())))
            }
        }
        let started = now_ms();
        let holder = format!(
            "coordinator process {} (started at Unix ms {started})\n",
            std::process::id()
        );
        file.set_len(0)
            .and_then(|()| file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| file.write_all(holder.as_bytes()))
            .map_err(|e| backend(format!("writing {}: {e}", path.display())))?;
        Ok(Self { _file: file })
    }
}

/// A task's state and attempt, if it exists.
fn state_of(tx: &Connection, task: u64) -> Result<Prior, StoreError> {
    let row: Option<(String, u32)> = tx
        .prepare_cached("SELECT state, attempt FROM tasks WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([task as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(backend)?;
    row.map(|(state, attempt)| {
        TaskState::parse(&state)
            .map(|state| (state, attempt))
            .ok_or_else(|| backend(format!("task {task} has an unknown state {state:?}")))
    })
    .transpose()
}

/// Ends running `attempt` of `task` as `state` (finished or failed) with its outcome; returns
/// the rows changed. The task's row records the attempt's end (see [`AttemptRecord`]).
fn end_attempt(
    tx: &Connection,
    task: u64,
    attempt: u32,
    state: TaskState,
    outcome: Option<&str>,
    now: i64,
) -> rusqlite::Result<usize> {
    exec(
        tx,
        "UPDATE tasks SET state = ?3, outcome = ?4, updated_ms = ?5
             WHERE id = ?1 AND state = 'running' AND attempt = ?2",
        params![task as i64, attempt, state.as_str(), outcome, now],
    )
}

/// Runs `sql` through the connection's statement cache: a statement is compiled once, not on
/// every change (compiling was 14% of the server's time under `http_load`).
fn exec(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn json(v: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(backend)
}

/// Applies one change; `rules::judge` decides what a statement that changed nothing means.
fn apply_one(tx: &Connection, change: &Change, now: i64) -> Result<(), StoreError> {
    let changed = rows_changed(tx, change, now)?;
    judge(change, changed as u64, |task| state_of(tx, task))
}

/// Runs the guarded statement(s) of `change`; returns the rows of the main one changed.
fn rows_changed(tx: &Connection, change: &Change, now: i64) -> Result<usize, StoreError> {
    let n = match change {
        Change::Submit(t) => exec(
            tx,
            "INSERT OR IGNORE INTO tasks (id, grp, tags, priority, payload, state, attempt,
                                          worker, outcome, submitted_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                t.id as i64,
                t.group,
                json(&t.tags)?,
                t.priority,
                t.payload,
                t.state.as_str(),
                t.attempt,
                t.worker.map(|w| w as i64),
                t.outcome,
                t.submitted_ms,
                now
            ],
        ),
        Change::Assign {
            task,
            worker,
            attempt,
        } => exec(
            tx,
            "UPDATE tasks SET state = 'running', attempt = ?2, worker = ?3, updated_ms = ?4
                 WHERE id = ?1 AND state IN ('queued', 'running') AND attempt < ?2",
            params![*task as i64, attempt, *worker as i64, now],
        ),
        Change::Requeue {
            task,
            attempt,
            worker,
            why,
        } => {
            // How the attempt ended, even if a later decision about the task already stands
            // (the first end recorded for an attempt is kept).
            exec(
                tx,
                "INSERT OR IGNORE INTO attempts (task, attempt, worker, ended, outcome, ended_ms)
                     VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                params![
                    *task as i64,
                    attempt,
                    *worker as i64,
                    AttemptEnd::Requeued(*why).as_str(),
                    now
                ],
            )
            .map_err(backend)?;
            exec(
                tx,
                "UPDATE tasks SET state = 'queued', attempt = ?2, worker = NULL, updated_ms = ?3
                     WHERE id = ?1 AND state IN ('queued', 'running')
                       AND (attempt < ?2 OR (attempt = ?2 AND state = 'running'))",
                params![*task as i64, attempt, now],
            )
        }
        Change::Finish {
            task,
            attempt,
            result,
        } => end_attempt(
            tx,
            *task,
            *attempt,
            TaskState::Finished,
            result.as_deref(),
            now,
        ),
        Change::Fail {
            task,
            attempt,
            message,
        } => end_attempt(tx, *task, *attempt, TaskState::Failed, Some(message), now),
        Change::Cancel { task } => {
            // A running attempt ends with the task, recorded from its row before it changes.
            exec(
                tx,
                "INSERT OR IGNORE INTO attempts (task, attempt, worker, ended, outcome, ended_ms)
                     SELECT id, attempt, worker, ?2, NULL, ?3 FROM tasks
                     WHERE id = ?1 AND state = 'running'",
                params![*task as i64, AttemptEnd::Cancelled.as_str(), now],
            )
            .map_err(backend)?;
            exec(
                tx,
                "UPDATE tasks SET state = 'cancelled', updated_ms = ?2
                     WHERE id = ?1 AND state IN ('queued', 'running')",
                params![*task as i64, now],
            )
        }
        Change::Update {
            task,
            priority,
            tags,
        } => {
            let tags = tags.as_deref().map(json).transpose()?;
            exec(
                tx,
                "UPDATE tasks SET priority = COALESCE(?2, priority), tags = COALESCE(?3, tags),
                                      updated_ms = ?4
                     WHERE id = ?1 AND state IN ('queued', 'running')",
                params![*task as i64, priority, tags, now],
            )
        }
        Change::AddWorker(w) => exec(
            tx,
            "INSERT OR IGNORE INTO workers (id, groups, tags, token_hash) VALUES (?1, ?2, ?3, ?4)",
            params![w.id as i64, json(&w.groups)?, json(&w.tags)?, w.token_hash],
        ),
        Change::RemoveWorker { worker } => exec(
            tx,
            "UPDATE workers SET removed = 1 WHERE id = ?1 AND removed = 0",
            [*worker as i64],
        ),
        // `OR IGNORE` also skips a token whose hash exists (the hash is unique).
        Change::AddToken(t) => exec(
            tx,
            "INSERT OR IGNORE INTO tokens (id, hash, role, groups, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                t.id as i64,
                t.hash,
                t.role.as_str(),
                json(&t.groups)?,
                t.created_ms
            ],
        ),
        Change::RevokeToken { id } => exec(
            tx,
            "UPDATE tokens SET revoked = 1 WHERE id = ?1 AND revoked = 0",
            [*id as i64],
        ),
        Change::Remember {
            key: k,
            expired_before_ms,
        } => {
            let ids = serde_json::to_string(&k.ids).map_err(backend)?;
            exec(
                tx,
                "INSERT INTO keys (scope, key, fingerprint, ids, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (scope, key) DO UPDATE
                     SET fingerprint = excluded.fingerprint, ids = excluded.ids,
                         created_ms = excluded.created_ms
                     WHERE keys.created_ms < ?6",
                params![
                    k.scope as i64,
                    k.key,
                    k.fingerprint,
                    ids,
                    k.created_ms,
                    expired_before_ms
                ],
            )
        }
        Change::ForgetKeys { before_ms } => {
            exec(tx, "DELETE FROM keys WHERE created_ms < ?1", [before_ms])
        }
        Change::Boot { boot } => exec(
            tx,
            "INSERT INTO meta (name, value) VALUES ('boot', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value WHERE value < excluded.value",
            [*boot as i64],
        ),
    };
    n.map_err(backend)
}

fn strings(json: String) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(&json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRecord> {
    let state: String = r.get(5)?;
    Ok(TaskRecord {
        id: r.get::<_, i64>(0)? as u64,
        group: r.get(1)?,
        tags: strings(r.get(2)?)?,
        priority: r.get(3)?,
        payload: r.get(4)?,
        state: TaskState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                5,
                rusqlite::types::Type::Text,
                format!("unknown task state {state:?}").into(),
            )
        })?,
        attempt: r.get(6)?,
        worker: r.get::<_, Option<i64>>(7)?.map(|w| w as u64),
        outcome: r.get(8)?,
        submitted_ms: r.get(9)?,
    })
}

const TASK_COLUMNS: &str =
    "id, grp, tags, priority, payload, state, attempt, worker, outcome, submitted_ms";
/// `TASK_COLUMNS` without the payload and outcome, which can be large (for list pages).
const SUMMARY_COLUMNS: &str =
    "id, grp, tags, priority, x'', state, attempt, worker, NULL, submitted_ms";

impl Store for SqliteStore {
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut conn = self.writer.lock();
        let tx = conn.transaction().map_err(backend)?;
        let now = now_ms();
        for change in changes {
            // An error drops `tx`, which rolls the whole batch back.
            apply_one(&tx, change, now)?;
        }
        tx.commit().map_err(backend)
    }

    fn recover_groups(&self, groups: Option<&[String]>) -> Result<Recovery, StoreError> {
        let serves =
            |w: &WorkerRecord| groups.is_none_or(|g| w.groups.iter().any(|x| g.contains(x)));
        let conn = self.reader.lock();
        let all_workers = conn
            .prepare("SELECT id, groups, tags, token_hash, removed FROM workers ORDER BY id")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    let worker = WorkerRecord {
                        id: r.get::<_, i64>(0)? as u64,
                        groups: strings(r.get(1)?)?,
                        tags: strings(r.get(2)?)?,
                        token_hash: r.get(3)?,
                    };
                    Ok((worker, r.get::<_, bool>(4)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(backend)?;
        let (removed, workers): (Vec<_>, Vec<_>) = all_workers
            .into_iter()
            .filter(|(w, _)| serves(w))
            .partition(|(_, removed)| *removed);
        let tokens = conn
            .prepare(
                "SELECT id, hash, role, groups, created_ms FROM tokens WHERE revoked = 0 ORDER BY id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    let role: String = r.get(2)?;
                    Ok(TokenRecord {
                        id: r.get::<_, i64>(0)? as u64,
                        hash: r.get(1)?,
                        role: Role::parse(&role).ok_or_else(|| {
                            rusqlite::Error::FromSqlConversionFailure(
                                2,
                                rusqlite::types::Type::Text,
                                format!("unknown role {role:?}").into(),
                            )
                        })?,
                        groups: strings(r.get(3)?)?,
                        created_ms: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(backend)?;
        let tasks = conn
            .prepare(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('queued', 'running')
                   AND (?1 IS NULL OR grp IN (SELECT value FROM json_each(?1)))
                 ORDER BY id"
            ))
            .and_then(|mut s| {
                let groups = groups.map(|g| serde_json::to_string(g).unwrap_or_default());
                s.query_map([groups], task_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(backend)?;
        let next = |table: &str| -> Result<u64, StoreError> {
            conn.query_row(
                &format!("SELECT COALESCE(MAX(id), 0) + 1 FROM {table}"),
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(backend)
        };
        let boot = conn
            .query_row("SELECT value FROM meta WHERE name = 'boot'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(backend)?
            .unwrap_or(0) as u64;
        Ok(Recovery {
            boot,
            tasks,
            next_task_id: next("tasks")?,
            next_worker_id: next("workers")?,
            workers: workers.into_iter().map(|(w, _)| w).collect(),
            removed_workers: removed.into_iter().map(|(w, _)| w).collect(),
            tokens,
            next_token_id: next("tokens")?,
        })
    }

    fn task(&self, id: u64) -> Result<Option<TaskRecord>, StoreError> {
        let conn = self.reader.lock();
        conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))
            .and_then(|mut s| s.query_row([id as i64], task_row).optional())
            .map_err(backend)
    }

    fn tasks(&self, ids: &[u64]) -> Result<Vec<TaskRecord>, StoreError> {
        let ids = serde_json::to_string(ids).map_err(backend)?;
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?1))"
            ))
            .map_err(backend)?;
        let rows = stmt.query_map([ids], task_row).map_err(backend)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError> {
        let conn = self.reader.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM tasks
                 WHERE id > ?1 AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR grp = ?3)
                   AND (?5 IS NULL OR grp IN (SELECT value FROM json_each(?5)))
                 ORDER BY id LIMIT ?4"
            ))
            .map_err(backend)?;
        let rows = stmt
            .query_map(
                params![
                    filter.after as i64,
                    filter.state.map(TaskState::as_str),
                    filter.group,
                    filter.limit as i64,
                    filter.within.as_deref().map(json).transpose()?
                ],
                task_row,
            )
            .map_err(backend)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
    }

    fn attempt(&self, task: u64, attempt: u32) -> Result<Option<AttemptRecord>, StoreError> {
        let conn = self.reader.lock();
        // An end of its own, else the task's row if that attempt ended the task.
        conn.prepare_cached(
            "SELECT worker, ended, outcome FROM attempts WHERE task = ?1 AND attempt = ?2
             UNION ALL
             SELECT worker, state, outcome FROM tasks
             WHERE id = ?1 AND attempt = ?2 AND state IN ('finished', 'failed')
               AND worker IS NOT NULL
             LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row(params![task as i64, attempt], |r| {
                let ended: String = r.get(1)?;
                Ok(AttemptRecord {
                    task,
                    attempt,
                    worker: r.get::<_, i64>(0)? as u64,
                    ended: AttemptEnd::parse(&ended),
                    outcome: r.get(2)?,
                })
            })
            .optional()
        })
        .map_err(backend)
    }

    fn key(&self, scope: u64, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let conn = self.reader.lock();
        let row = conn
            .prepare_cached(
                "SELECT fingerprint, ids, created_ms FROM keys WHERE scope = ?1 AND key = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![scope as i64, key], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(backend)?;
        row.map(|(fingerprint, ids, created_ms)| {
            Ok(KeyRecord {
                scope,
                key: key.to_string(),
                fingerprint,
                ids: serde_json::from_str(&ids).map_err(backend)?,
                created_ms,
            })
        })
        .transpose()
    }

    fn reserve(&self, kind: IdKind, n: u64) -> Result<std::ops::Range<u64>, StoreError> {
        let (table, counter) = match kind {
            IdKind::Task => ("tasks", "next_task"),
            IdKind::Worker => ("workers", "next_worker"),
            IdKind::Token => ("tokens", "next_token"),
        };
        let mut conn = self.writer.lock();
        let tx = conn.transaction().map_err(backend)?;
        // Above every stored id and every earlier reservation.
        let start: i64 = tx
            .query_row(
                &format!(
                    "SELECT MAX(COALESCE((SELECT MAX(id) FROM {table}), 0) + 1,
                                COALESCE((SELECT value FROM meta WHERE name = ?1), 1))"
                ),
                [counter],
                |r| r.get(0),
            )
            .map_err(backend)?;
        let end = start
            .checked_add(i64::try_from(n).map_err(backend)?)
            .ok_or_else(|| StoreError::Backend(format!("{table} ids are exhausted")))?;
        exec(
            &tx,
            "INSERT INTO meta (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params![counter, end],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(start as u64..end as u64)
    }
}
