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
//! stall whoever committed); the journal thread checkpoints when it is idle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::store::state_db::{Change, StateDb};

type Reply = oneshot::Sender<Result<Vec<i64>, String>>;

pub struct Journal {
    db: Arc<Mutex<StateDb>>,
    queue: mpsc::Sender<(Vec<Change>, Reply)>,
    /// Writers waiting for the journal thread.
    waiting: AtomicUsize,
}

impl Journal {
    /// Starts the thread that commits queued changes and checkpoints.
    pub fn start(db: StateDb) -> Journal {
        let db = Arc::new(Mutex::new(db));
        let (queue, pending) = mpsc::channel::<(Vec<Change>, Reply)>();
        let shared = Arc::clone(&db);
        std::thread::Builder::new()
            .name("renv-journal".into())
            .spawn(move || {
                let mut since_checkpoint = 0usize;
                loop {
                    let first = match pending.recv_timeout(Duration::from_secs(1)) {
                        Ok(first) => first,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = shared.lock().unwrap().checkpoint();
                            since_checkpoint = 0;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    let mut batch = vec![first];
                    batch.extend(pending.try_iter());
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
                    if since_checkpoint >= 1000 {
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
        }
    }

    /// Commits `changes` (all or none); returns one result per change (see
    /// [`StateDb::commit`]).
    pub async fn write(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        if self.waiting.load(Ordering::Acquire) == 0
            && let Ok(mut db) = self.db.try_lock()
        {
            return db.commit(&changes).map_err(|e| e.to_string());
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let answered = self.queued(changes).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        answered
    }

    async fn queued(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((changes, reply))
            .map_err(|_| "the state journal has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the state journal has stopped".to_string())?
    }
}
