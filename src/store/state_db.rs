//! What the daemon knows that must outlive it: references (with their owners and tags),
//! the envs they hold, and workers (ids, GPUs, supervisors, exit statuses), in one SQLite
//! database in the store (`state/daemon.db`), as cargo keeps its global cache tracker.
//!
//! Why SQLite: several processes write it (the daemon, and each worker's supervisor when
//! its worker ends, with or without a daemon running), `renv prune` reads it, and every
//! change must be whole or absent after a `kill -9` at any instruction. SQLite's WAL gives
//! exactly that, with readers never blocking the writer. A log of our own would need its
//! own locking, compaction and torn-write recovery.
//!
//! Durability: `synchronous=NORMAL` in WAL mode. A committed change survives the death of
//! any process (it is in the WAL, in the page cache, before `COMMIT` returns); a power
//! loss may lose the last commits, and then their processes are gone too (workers,
//! leases), which is what the lost changes described. The daemon's callers are answered
//! only after their change is committed.
//!
//! Prune reads the same database: an entry an env here is referenced by, or a running
//! worker runs in, is a root, whether or not a daemon is up to hold its lease ([`roots`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::StoreError;
use super::layout::{EntryId, Layout};

/// Bumped with any change of the schema that an older renv's writers cannot live with; a
/// database of another version is refused. Supervisors of the renv before an upgrade
/// still record their workers' ends here (they run the old binary until their worker
/// ends), so a change they never see — the layout of `refs`, which only a daemon writes —
/// is brought up in place ([`REFS_BY_ENV`]) and keeps the version.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS envs (
    env_id  TEXT PRIMARY KEY,
    -- How to find the env's entries again (the build layer's JSON, opaque here).
    recipe  TEXT NOT NULL,
    -- The entries it uses, as names (`pkg-<digest>`), space-separated: prune's roots.
    entries TEXT NOT NULL
);
-- Keyed by env, so a new reference writes one leaf page and no index: it is the write
-- every cached get-or-create makes. Ids are given by the one connection that adds
-- references (the daemon's), counting on from the largest at open; a released
-- reference's id may be given again, which no one can tell.
CREATE TABLE IF NOT EXISTS refs (
    env_id  TEXT NOT NULL,
    id      INTEGER NOT NULL,
    uid     INTEGER NOT NULL,
    tag     TEXT,
    PRIMARY KEY (env_id, id)
) WITHOUT ROWID;
-- AUTOINCREMENT: a worker's number is never given again, even after its row is gone.
CREATE TABLE IF NOT EXISTS workers (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    env_id          TEXT NOT NULL,
    uid             INTEGER NOT NULL,
    name            TEXT,
    pid             INTEGER NOT NULL,
    -- The worker's start time (as the supervisor's below): its pid and group are its own
    -- only while this matches.
    pid_start       INTEGER NOT NULL DEFAULT 0,
    gpus            TEXT NOT NULL,
    started_at      REAL NOT NULL,
    state           TEXT NOT NULL,
    exit_code       INTEGER,
    signal          INTEGER,
    ended_at        REAL,
    supervisor_pid  INTEGER NOT NULL,
    -- The supervisor's start time (clock ticks after boot, /proc/<pid>/stat field 22):
    -- with its pid, it names that process and no later one.
    supervisor_start INTEGER NOT NULL,
    cgroup          TEXT
);
CREATE INDEX IF NOT EXISTS workers_by_state ON workers(state);
";

/// References keyed by env, from the first layout (a rowid, and an index on env_id).
const REFS_BY_ENV: &str = "
    CREATE TABLE refs_by_env_id (
        env_id TEXT NOT NULL, id INTEGER NOT NULL, uid INTEGER NOT NULL, tag TEXT,
        PRIMARY KEY (env_id, id)
    ) WITHOUT ROWID;
    INSERT INTO refs_by_env_id (env_id, id, uid, tag) SELECT env_id, id, uid, tag FROM refs;
    DROP TABLE refs;
    ALTER TABLE refs_by_env_id RENAME TO refs;";

/// A worker's state while it runs (the others are its end: succeeded, failed, stopped,
/// lost).
pub const RUNNING: &str = "running";

/// A reference as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRef {
    pub id: i64,
    pub env_id: String,
    pub uid: u32,
    pub tag: Option<String>,
}

/// An env something holds, as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedEnv {
    pub env_id: String,
    pub recipe: String,
    pub entries: Vec<EntryId>,
}

/// A worker as saved (running, or ended and not yet forgotten).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedWorker {
    pub seq: i64,
    pub env_id: String,
    pub uid: u32,
    pub name: Option<String>,
    pub pid: u32,
    /// The worker's start time (0: not known yet).
    pub pid_start: u64,
    pub gpus: Vec<u32>,
    pub started_at: f64,
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at: Option<f64>,
    /// Its supervisor: pid and start time (see the schema).
    pub supervisor: (u32, u64),
    pub cgroup: Option<PathBuf>,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerEnd {
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at: f64,
}

/// Everything saved, as a restarting daemon reads it.
#[derive(Debug, Default)]
pub struct Saved {
    pub envs: Vec<SavedEnv>,
    pub refs: Vec<SavedRef>,
    pub workers: Vec<SavedWorker>,
    /// The number the next worker gets.
    pub next_worker: i64,
}

/// One change; a batch of them is committed whole or not at all.
#[derive(Debug, Clone)]
pub enum Change {
    /// Saves an env (once; saving it again changes nothing).
    PutEnv(SavedEnv),
    /// Removes an env's row unless a reference or a running worker still holds it.
    DropEnvIfUnheld {
        env_id: String,
    },
    /// A new reference; its id is the change's result.
    AddRef {
        env_id: String,
        uid: u32,
        tag: Option<String>,
    },
    DropRef {
        env_id: String,
        id: i64,
    },
    AddWorker(SavedWorker),
    /// The worker's pid and start time, once its supervisor has started it.
    WorkerPid {
        seq: i64,
        pid: u32,
        start: u64,
    },
    /// Records a running worker's end (a worker already ended is left as it was: the
    /// first record of an end wins).
    WorkerEnded {
        seq: i64,
        end: WorkerEnd,
    },
    ForgetWorker {
        seq: i64,
    },
}

pub struct StateDb {
    conn: Connection,
    written: Written,
}

/// What one connection knows of the rows it writes.
#[derive(Default)]
struct Written {
    /// The largest reference id given (see the schema).
    last_ref: i64,
    /// Env rows this connection committed and has not asked to drop since. Only a
    /// [`Change::DropEnvIfUnheld`] drops an env row, and only the daemon's one connection
    /// makes those (supervisors record workers' ends, `renv prune` and `renv ls` read), so
    /// saving one of these again would change nothing: it is skipped.
    envs: HashSet<String>,
    /// Env rows saved by the transaction under way, known once it commits.
    envs_put: Vec<String>,
}

/// Beyond this many, the env rows known saved are forgotten (and saved again once each).
const MAX_KNOWN_ENVS: usize = 65_536;

impl Written {
    /// The transaction under way committed.
    fn committed(&mut self) {
        if self.envs.len() + self.envs_put.len() > MAX_KNOWN_ENVS {
            self.envs.clear();
        }
        self.envs.extend(self.envs_put.drain(..));
    }
}

fn db_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Unusable {
        path: path.to_path_buf(),
        reason: format!("state database: {e}"),
    }
}

impl StateDb {
    /// The database file, for errors.
    fn path(&self) -> PathBuf {
        self.conn.path().map(PathBuf::from).unwrap_or_default()
    }

    /// Opens (creating if needed) the store's state database for reading and writing.
    pub fn open(layout: &Layout) -> Result<StateDb, StoreError> {
        let path = layout.state_db_path();
        let err = db_error(&path);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(&err)?;
        // Another writer (a supervisor recording an exit) holds the lock for microseconds.
        conn.busy_timeout(Duration::from_secs(30)).map_err(&err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(&err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(&err)?;
        // A WAL that has grown (a burst of commits between checkpoints) is cut back to
        // this when it starts over.
        conn.pragma_update(None, "journal_size_limit", 16 << 20)
            .map_err(&err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(&err)?;
        let unusable = |reason: String| StoreError::Unusable {
            path: path.clone(),
            reason,
        };
        match version {
            0 => {
                conn.execute_batch(SCHEMA).map_err(&err)?;
                conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(&err)?;
            }
            SCHEMA_VERSION => bring_refs_up(&conn)
                .map_err(|e| unusable(format!("state database: keying references by env: {e}")))?,
            other => {
                return Err(unusable(format!(
                    "state database version {other}, this renv reads version {SCHEMA_VERSION}"
                )));
            }
        }
        let last_ref = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM refs", [], |row| row.get(0))
            .map_err(&err)?;
        Ok(StateDb {
            conn,
            written: Written {
                last_ref,
                ..Written::default()
            },
        })
    }

    /// Stops checkpointing on commit: the owner calls [`Self::checkpoint`] when it suits
    /// it (a checkpoint may `fsync`).
    pub fn checkpoint_manually(&self) -> Result<(), StoreError> {
        let path = self.path();
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db_error(&path))
    }

    /// Copies what the WAL holds into the database, as far as no reader needs it.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let path = self.path();
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(db_error(&path))
    }

    /// Commits `changes` as one transaction. Returns one result per change: the new
    /// reference's id for [`Change::AddRef`], 0 for the others.
    pub fn commit(&mut self, changes: &[Change]) -> Result<Vec<i64>, StoreError> {
        let path = self.path();
        let mut results = self.commit_batches(&[changes])?;
        results
            .pop()
            .expect("one result per batch")
            .map_err(|reason| StoreError::Unusable {
                path,
                reason: format!("state database: {reason}"),
            })
    }

    /// Commits each batch in a transaction of its own within one commit: a batch that
    /// fails is rolled back alone (the others still commit). One result per batch.
    pub fn commit_batches(
        &mut self,
        batches: &[&[Change]],
    ) -> Result<Vec<Result<Vec<i64>, String>>, StoreError> {
        let path = self.path();
        let err = db_error(&path);
        self.written.envs_put.clear();
        let written = &mut self.written;
        // IMMEDIATE: the write lock from the start, so two writing processes (the daemon,
        // a supervisor) wait for each other at BEGIN instead of failing at the first write.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        // Changes that fail are rare (a disk error fails them all): all in one go first
        // (one batch needs nothing more: its failure is the transaction's), and only if
        // that fails, again with a savepoint per batch.
        let applied: Result<Vec<Vec<i64>>, rusqlite::Error> = batches
            .iter()
            .map(|batch| batch.iter().map(|c| apply(&tx, c, written)).collect())
            .collect();
        match applied {
            Ok(ids) => {
                tx.commit().map_err(&err)?;
                written.committed();
                return Ok(ids.into_iter().map(Ok).collect());
            }
            Err(e) if batches.len() == 1 => {
                // Dropping the transaction rolls it back.
                written.envs_put.clear();
                return Ok(vec![Err(e.to_string())]);
            }
            Err(_) => {
                tx.rollback().map_err(&err)?;
                written.envs_put.clear();
            }
        }
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let sp = tx.savepoint().map_err(&err)?;
            let put_before = written.envs_put.len();
            let applied: Result<Vec<i64>, rusqlite::Error> =
                batch.iter().map(|c| apply(&sp, c, written)).collect();
            match applied {
                Ok(ids) => {
                    sp.commit().map_err(&err)?;
                    results.push(Ok(ids));
                }
                // Dropping the savepoint rolls it back.
                Err(e) => {
                    written.envs_put.truncate(put_before);
                    results.push(Err(e.to_string()));
                }
            }
        }
        tx.commit().map_err(&err)?;
        written.committed();
        Ok(results)
    }

    /// Everything saved.
    pub fn load(&self) -> Result<Saved, StoreError> {
        let path = self.path();
        let err = db_error(&path);
        let conn = &self.conn;
        let envs = conn
            .prepare("SELECT env_id, recipe, entries FROM envs")
            .map_err(&err)?
            .query_map([], |row| {
                let entries: String = row.get(2)?;
                Ok(SavedEnv {
                    env_id: row.get(0)?,
                    recipe: row.get(1)?,
                    entries: parse_entries(&entries),
                })
            })
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        let refs = conn
            .prepare("SELECT id, env_id, uid, tag FROM refs ORDER BY id")
            .map_err(&err)?
            .query_map([], |row| {
                Ok(SavedRef {
                    id: row.get(0)?,
                    env_id: row.get(1)?,
                    uid: row.get(2)?,
                    tag: row.get(3)?,
                })
            })
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        let workers = conn
            .prepare(&format!("{SELECT_WORKERS} ORDER BY seq"))
            .map_err(&err)?
            .query_map([], worker_row)
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        // The highest number ever given, rows forgotten since included.
        let last: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'workers'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(&err)?;
        Ok(Saved {
            envs,
            refs,
            workers,
            next_worker: last.unwrap_or(0) + 1,
        })
    }

    /// The worker `seq` as saved.
    pub fn worker(&self, seq: i64) -> Result<Option<SavedWorker>, StoreError> {
        let path = self.path();
        let err = db_error(&path);
        self.conn
            .prepare_cached(&format!("{SELECT_WORKERS} WHERE seq = ?1"))
            .map_err(&err)?
            .query_row([seq], worker_row)
            .optional()
            .map_err(&err)
    }
}

const SELECT_WORKERS: &str = "SELECT seq, env_id, uid, name, pid, gpus, started_at, state, exit_code, signal, \
                              ended_at, supervisor_pid, supervisor_start, cgroup, pid_start FROM workers";

fn worker_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SavedWorker> {
    let gpus: String = row.get(5)?;
    Ok(SavedWorker {
        seq: row.get(0)?,
        env_id: row.get(1)?,
        uid: row.get(2)?,
        name: row.get(3)?,
        pid: row.get(4)?,
        gpus: gpus.split(',').filter_map(|id| id.parse().ok()).collect(),
        started_at: row.get(6)?,
        state: row.get(7)?,
        exit_code: row.get(8)?,
        signal: row.get(9)?,
        ended_at: row.get(10)?,
        supervisor: (row.get(11)?, row.get::<_, i64>(12)? as u64),
        cgroup: row.get::<_, Option<String>>(13)?.map(PathBuf::from),
        pid_start: row.get::<_, i64>(14)? as u64,
    })
}

fn parse_entries(text: &str) -> Vec<EntryId> {
    text.split(' ').filter_map(|name| name.parse().ok()).collect()
}

/// Moves `refs` to its current layout if it is still in the first one (checked and moved
/// in one transaction, so two processes opening the database at once move it once).
fn bring_refs_up(conn: &Connection) -> Result<(), rusqlite::Error> {
    let sql = "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'refs'";
    let current = |conn: &Connection| -> Result<bool, rusqlite::Error> {
        let table: String = conn.query_row(sql, [], |row| row.get(0))?;
        Ok(table.contains("WITHOUT ROWID"))
    };
    if current(conn)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let moved = match current(conn) {
        Ok(true) => Ok(()),
        Ok(false) => conn.execute_batch(REFS_BY_ENV),
        Err(e) => Err(e),
    };
    match moved {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Applies one change, in a transaction `written` knows of.
fn apply(conn: &Connection, change: &Change, written: &mut Written) -> Result<i64, rusqlite::Error> {
    match change {
        Change::PutEnv(env) => {
            if written.envs.contains(&env.env_id) || written.envs_put.contains(&env.env_id) {
                return Ok(0);
            }
            let entries: Vec<String> = env.entries.iter().map(EntryId::to_string).collect();
            conn.prepare_cached("INSERT OR IGNORE INTO envs (env_id, recipe, entries) VALUES (?1, ?2, ?3)")?
                .execute(params![env.env_id, env.recipe, entries.join(" ")])?;
            written.envs_put.push(env.env_id.clone());
        }
        Change::DropEnvIfUnheld { env_id } => {
            written.envs.remove(env_id);
            written.envs_put.retain(|put| put != env_id);
            conn.prepare_cached(
                "DELETE FROM envs WHERE env_id = ?1 \
                 AND NOT EXISTS (SELECT 1 FROM refs WHERE env_id = ?1) \
                 AND NOT EXISTS (SELECT 1 FROM workers WHERE env_id = ?1 AND state = 'running')",
            )?
            .execute(params![env_id])?;
        }
        Change::AddRef { env_id, uid, tag } => {
            let id = written.last_ref + 1;
            conn.prepare_cached("INSERT INTO refs (env_id, id, uid, tag) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![env_id, id, uid, tag])?;
            written.last_ref = id;
            return Ok(id);
        }
        Change::DropRef { env_id, id } => {
            conn.prepare_cached("DELETE FROM refs WHERE env_id = ?1 AND id = ?2")?
                .execute(params![env_id, id])?;
        }
        Change::AddWorker(w) => {
            let gpus: Vec<String> = w.gpus.iter().map(u32::to_string).collect();
            conn.prepare_cached(
                "INSERT INTO workers (seq, env_id, uid, name, pid, gpus, started_at, state, exit_code, signal, \
                 ended_at, supervisor_pid, supervisor_start, cgroup, pid_start) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(params![
                w.seq,
                w.env_id,
                w.uid,
                w.name,
                w.pid,
                gpus.join(","),
                w.started_at,
                w.state,
                w.exit_code,
                w.signal,
                w.ended_at,
                w.supervisor.0,
                w.supervisor.1 as i64,
                w.cgroup.as_ref().map(|p| p.display().to_string()),
                w.pid_start as i64,
            ])?;
        }
        Change::WorkerPid { seq, pid, start } => {
            conn.prepare_cached("UPDATE workers SET pid = ?2, pid_start = ?3 WHERE seq = ?1")?
                .execute(params![seq, pid, *start as i64])?;
        }
        Change::WorkerEnded { seq, end } => {
            conn.prepare_cached(
                "UPDATE workers SET state = ?2, exit_code = ?3, signal = ?4, ended_at = ?5 \
                 WHERE seq = ?1 AND state = 'running'",
            )?
            .execute(params![seq, end.state, end.exit_code, end.signal, end.ended_at])?;
        }
        Change::ForgetWorker { seq } => {
            conn.prepare_cached("DELETE FROM workers WHERE seq = ?1")?
                .execute(params![seq])?;
        }
    }
    Ok(0)
}

/// Entries the saved state holds (referenced envs', running workers'), each with what
/// holds it — read without a daemon, for prune and `renv ls`. No database: none.
pub fn roots(layout: &Layout) -> Result<HashMap<EntryId, Vec<String>>, StoreError> {
    let path = layout.state_db_path();
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let err = db_error(&path);
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(&err)?;
    let mut roots: HashMap<EntryId, Vec<String>> = HashMap::new();
    let held = conn
        .prepare(
            "SELECT e.entries, 'reference ' || r.id || ' (uid ' || r.uid || ')' FROM envs e JOIN refs r USING (env_id) \
             UNION ALL \
             SELECT e.entries, printf('worker w%06d (uid %d)', w.seq, w.uid) FROM envs e JOIN workers w USING (env_id) \
             WHERE w.state = 'running'",
        )
        .map_err(&err)?
        .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
        .map_err(&err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(&err)?;
    for (entries, holder) in held {
        for entry in parse_entries(&entries) {
            let holders = roots.entry(entry).or_default();
            if !holders.contains(&holder) {
                holders.push(holder.clone());
            }
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(seq: i64, env_id: &str) -> SavedWorker {
        SavedWorker {
            seq,
            env_id: env_id.into(),
            uid: 1000,
            name: Some("job".into()),
            pid: 42,
            gpus: vec![0, 1],
            started_at: 1.5,
            state: RUNNING.into(),
            exit_code: None,
            signal: None,
            ended_at: None,
            supervisor: (41, 12345),
            cgroup: None,
            pid_start: 7,
        }
    }

    #[test]
    fn state_round_trips_and_numbers_are_never_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let entry: EntryId = format!("pkg-{}", "ab".repeat(32)).parse().unwrap();
        let mut db = StateDb::open(&layout).unwrap();
        let ids = db
            .commit(&[
                Change::PutEnv(SavedEnv {
                    env_id: "e1".into(),
                    recipe: "{}".into(),
                    entries: vec![entry],
                }),
                Change::AddRef {
                    env_id: "e1".into(),
                    uid: 1000,
                    tag: Some("t".into()),
                },
                Change::AddWorker(worker(1, "e1")),
                Change::AddWorker(worker(2, "e1")),
            ])
            .unwrap();
        assert!(ids[1] > 0);
        assert_eq!(
            roots(&layout).unwrap()[&entry].len(),
            3,
            "one reference, two workers"
        );
        // A failing batch is rolled back alone.
        let results = db
            .commit_batches(&[
                &[Change::AddWorker(worker(2, "e1"))],
                &[Change::ForgetWorker { seq: 2 }],
            ])
            .unwrap();
        assert!(results[0].is_err() && results[1].is_ok());
        let end = WorkerEnd {
            state: "succeeded".into(),
            exit_code: Some(0),
            signal: None,
            ended_at: 2.0,
        };
        db.commit(&[Change::WorkerEnded {
            seq: 1,
            end: end.clone(),
        }])
        .unwrap();
        // The first end recorded wins.
        let later = WorkerEnd {
            state: "lost".into(),
            ..end
        };
        db.commit(&[Change::WorkerEnded { seq: 1, end: later }]).unwrap();
        drop(db);
        let db = StateDb::open(&layout).unwrap();
        let saved = db.load().unwrap();
        assert_eq!(saved.workers.len(), 1);
        assert_eq!(saved.workers[0].state, "succeeded");
        assert_eq!(saved.workers[0].gpus, vec![0, 1]);
        assert_eq!(
            saved.next_worker, 3,
            "w000002 was forgotten, and is never given again"
        );
        assert_eq!(saved.refs[0].tag.as_deref(), Some("t"));
        assert_eq!(saved.envs[0].entries, vec![entry]);
        let mut db = db;
        db.commit(&[
            Change::DropRef {
                env_id: "e1".into(),
                id: ids[1],
            },
            Change::DropEnvIfUnheld { env_id: "e1".into() },
        ])
        .unwrap();
        assert!(roots(&layout).unwrap().is_empty());
        assert!(db.load().unwrap().envs.is_empty());
    }

    /// An env row this connection saved is not written again until it may be gone: once
    /// its drop is asked for (in the same transaction or an earlier one), or when the
    /// transaction that saved it failed. No saved reference is ever without its env.
    #[test]
    fn env_rows_are_saved_again_whenever_they_may_be_gone() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let entry: EntryId = format!("pkg-{}", "cd".repeat(32)).parse().unwrap();
        let env = |id: &str| {
            Change::PutEnv(SavedEnv {
                env_id: id.into(),
                recipe: "{}".into(),
                entries: vec![entry],
            })
        };
        let add = |id: &str| Change::AddRef {
            env_id: id.into(),
            uid: 1000,
            tag: None,
        };
        let drop = |id: &str, r: i64| {
            [
                Change::DropRef {
                    env_id: id.into(),
                    id: r,
                },
                Change::DropEnvIfUnheld { env_id: id.into() },
            ]
        };
        let mut db = StateDb::open(&layout).unwrap();
        let saved_envs =
            |db: &StateDb| -> Vec<String> { db.load().unwrap().envs.into_iter().map(|e| e.env_id).collect() };
        let first = db.commit(&[env("e1"), add("e1")]).unwrap()[1];
        // Its last reference dropped and a new one taken in one commit: the row is back.
        let results = db
            .commit_batches(&[&drop("e1", first), &[env("e1"), add("e1")]])
            .unwrap();
        let second = results[1].as_ref().unwrap()[1];
        assert_eq!(saved_envs(&db), ["e1"]);
        // Dropped in one commit, saved again in the next.
        db.commit(&drop("e1", second)).unwrap();
        assert!(saved_envs(&db).is_empty());
        db.commit(&[env("e1"), add("e1")]).unwrap();
        assert_eq!(saved_envs(&db), ["e1"]);
        // A batch that failed saved nothing, and does not count as saved.
        db.commit(&[Change::AddWorker(worker(1, "e1"))]).unwrap();
        let results = db
            .commit_batches(&[
                &[env("e2"), add("e2"), Change::AddWorker(worker(1, "e2"))],
                &[add("e1")],
            ])
            .unwrap();
        assert!(results[0].is_err() && results[1].is_ok());
        assert_eq!(saved_envs(&db), ["e1"]);
        db.commit(&[env("e2"), add("e2")]).unwrap();
        let mut envs = saved_envs(&db);
        envs.sort();
        assert_eq!(envs, ["e1", "e2"]);
        assert!(
            db.load()
                .unwrap()
                .refs
                .iter()
                .all(|r| r.env_id == "e1" || r.env_id == "e2")
        );
    }

    /// A database the renv before wrote (references with a rowid) opens with its
    /// references kept and keyed by env, numbering goes on after them, and the version
    /// stays the one that renv's supervisors accept.
    #[test]
    fn references_in_the_first_layout_are_brought_up_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create().unwrap();
        let v1 = Connection::open(layout.state_db_path()).unwrap();
        v1.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE envs (env_id TEXT PRIMARY KEY, recipe TEXT NOT NULL, entries TEXT NOT NULL);
             CREATE TABLE refs (id INTEGER PRIMARY KEY, env_id TEXT NOT NULL, uid INTEGER NOT NULL, tag TEXT);
             CREATE INDEX refs_by_env ON refs(env_id);
             CREATE TABLE workers (seq INTEGER PRIMARY KEY AUTOINCREMENT, env_id TEXT NOT NULL,
                 uid INTEGER NOT NULL, name TEXT, pid INTEGER NOT NULL, pid_start INTEGER NOT NULL DEFAULT 0,
                 gpus TEXT NOT NULL, started_at REAL NOT NULL, state TEXT NOT NULL, exit_code INTEGER,
                 signal INTEGER, ended_at REAL, supervisor_pid INTEGER NOT NULL,
                 supervisor_start INTEGER NOT NULL, cgroup TEXT);
             CREATE INDEX workers_by_state ON workers(state);
             INSERT INTO envs VALUES ('e1', '{}', '');
             INSERT INTO refs (id, env_id, uid, tag) VALUES (7, 'e1', 1000, 'kept');
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(v1);
        let mut db = StateDb::open(&layout).unwrap();
        let saved = db.load().unwrap();
        assert_eq!(saved.refs.len(), 1);
        assert_eq!(
            (saved.refs[0].id, saved.refs[0].tag.as_deref()),
            (7, Some("kept"))
        );
        let ids = db
            .commit(&[Change::AddRef {
                env_id: "e1".into(),
                uid: 1000,
                tag: None,
            }])
            .unwrap();
        assert_eq!(ids, vec![8]);
        let version: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, 1, "an older supervisor still writes its worker's end");
        let layout_sql: String = db
            .conn
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'refs'", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert!(layout_sql.contains("WITHOUT ROWID"), "{layout_sql}");
        // Opened again: nothing more to do.
        drop(db);
        assert_eq!(StateDb::open(&layout).unwrap().load().unwrap().refs.len(), 2);
    }
}
