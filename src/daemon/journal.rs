//! Writing the daemon's state ([`crate::store::state_db`]) before answering, at the cost of
//! one commit and no more.
//!
//! With nothing else waiting, a change is committed right where it is made: a commit is
//! a few microseconds of WAL append, less than waking another thread and being woken
//! back. When other writers are waiting already (many clients at once), changes go to one
//! thread that commits whatever has queued up in one transaction (group commit, as
//! databases do with their logs), each caller's changes in a savepoint of their own so
//! one caller's failure is its own. Either way a caller is answered only once its changes
//! are committed.
//!
//! The daemon's connection never checkpoints on its own (that may `fsync`, and would
//! stall whoever committed); the journal thread checkpoints every thousand commits and
//! when idle, and the WAL is cut back to its size limit each time it starts over (see
//! `state_db`), so it cannot grow with the number of requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::store::state_db::{Change, StateDb};

type Reply = oneshot::Sender<Result<Vec<i64>, String>>;

/// What the journal thread is asked to do.
enum Job {
    Write(Vec<Change>, Reply),
    /// Copy the WAL into the database (commits made in place ask for it every
    /// [`CHECKPOINT_EVERY`]), so the WAL is reset instead of growing.
    Checkpoint,
}

/// Commits between checkpoints.
const CHECKPOINT_EVERY: usize = 1000;

pub struct Journal {
    db: Arc<Mutex<StateDb>>,
    queue: mpsc::Sender<Job>,
    /// Writers waiting for the journal thread.
    waiting: AtomicUsize,
    /// Commits made in place since the last checkpoint was asked for.
    in_place: AtomicUsize,
}

impl Journal {
    /// Starts the thread that commits queued changes and checkpoints.
    pub fn start(db: StateDb) -> Journal {
        let db = Arc::new(Mutex::new(db));
        let (queue, pending) = mpsc::channel::<Job>();
        let shared = Arc::clone(&db);
        std::thread::Builder::new()
            .name("renv-journal".into())
            .spawn(move || {
                let mut since_checkpoint = 0usize;
                loop {
                    let first = match pending.recv_timeout(Duration::from_secs(1)) {
                        Ok(Job::Write(changes, reply)) => (changes, reply),
                        Ok(Job::Checkpoint) | Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = shared.lock().unwrap().checkpoint();
                            since_checkpoint = 0;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    let mut batch = vec![first];
                    let mut checkpoint = false;
                    for job in pending.try_iter() {
                        match job {
                            Job::Write(changes, reply) => batch.push((changes, reply)),
                            Job::Checkpoint => checkpoint = true,
                        }
                    }
                    let changes: Vec<&[Change]> = batch.iter().map(|(c, _)| c.as_slice()).collect();
                    let mut db = shared.lock().unwrap();
                    match db.commit_batches(&changes) {
                        Ok(results) => {
                            for ((_, reply), result) in batch.into_iter().zip(results) {
                                let _ = reply.send(result);
                            }
                        }
                        Err(e) => {
                            for (_, reply) in batch {
                                let _ = reply.send(Err(e.to_string()));
                            }
                        }
                    }
                    since_checkpoint += 1;
                    if checkpoint || since_checkpoint >= CHECKPOINT_EVERY {
                        let _ = db.checkpoint();
                        since_checkpoint = 0;
                    }
                }
            })
            .expect("the journal thread starts");
        Journal {
            db,
            queue,
            waiting: AtomicUsize::new(0),
            in_place: AtomicUsize::new(0),
        }
    }

    /// Commits `changes` (all or none); returns one result per change (see
    /// [`StateDb::commit`]).
    pub async fn write(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        if self.waiting.load(Ordering::Acquire) == 0
            && let Ok(mut db) = self.db.try_lock()
        {
            let committed = db.commit(&changes).map_err(|e| e.to_string());
            drop(db);
            if self.in_place.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_EVERY {
                self.in_place.store(0, Ordering::Relaxed);
                let _ = self.queue.send(Job::Checkpoint);
            }
            return committed;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let answered = self.queued(changes).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        answered
    }

    async fn queued(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job::Write(changes, reply))
            .map_err(|_| "the state journal has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the state journal has stopped".to_string())?
    }
}
