//! Writing the daemon's state ([`crate::store::state_db`]) before answering, without a
//! commit per request: one thread owns the database and commits whatever changes are
//! waiting in one transaction (group commit, as databases do with their logs), each
//! request's changes in a savepoint of their own so one request's failure is its own.
//! A request is answered only once its changes are committed.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::state_db::{Change, StateDb};

type Reply = oneshot::Sender<Result<Vec<i64>, String>>;

pub struct Journal {
    queue: mpsc::Sender<(Vec<Change>, Reply)>,
}

impl Journal {
    /// Starts the thread that owns `db`.
    pub fn start(mut db: StateDb) -> Journal {
        let (queue, pending) = mpsc::channel::<(Vec<Change>, Reply)>();
        std::thread::Builder::new()
            .name("renv-journal".into())
            .spawn(move || {
                while let Ok(first) = pending.recv() {
                    let mut batch = vec![first];
                    batch.extend(pending.try_iter());
                    let changes: Vec<&[Change]> = batch.iter().map(|(c, _)| c.as_slice()).collect();
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
                }
            })
            .expect("the journal thread starts");
        Journal { queue }
    }

    /// Commits `changes` (all or none); returns one result per change (see
    /// [`StateDb::commit`]).
    pub async fn write(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((changes, reply))
            .map_err(|_| "the state journal has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the state journal has stopped".to_string())?
    }
}
