//! Writing the daemon's state ([`crate::store::state_db`]) before answering, at the cost of
//! a share of one commit.
//!
//! Requests run on one event loop. The first write of a round does not commit at once: it
//! lets the loop run the other requests already ready (each adds its own write, and waits)
//! and then commits all of them in one transaction, right there on the loop (group commit,
//! as databases do with their logs). A commit is a few microseconds of locks and WAL
//! append whatever it holds, so sixteen clients at once pay for about one commit instead
//! of sixteen; a lone request waits for nothing, as no other task is ready. Writes that
//! fail are rare, so they are all applied in one go, and only if one fails, again with a
//! savepoint each, so one caller's failure is its own. Either way a caller is answered
//! only once its changes are committed, and a write once made is committed even if its
//! caller goes away meanwhile (its client hung up), as a commit made at once would have
//! been: what a caller changed in memory before writing is saved all the same.
//!
//! The daemon's connection never checkpoints on its own (that may `fsync`, and would
//! stall whoever committed); the journal thread checkpoints every thousand commits and
//! when idle, and the WAL is cut back to its size limit each time it starts over (see
//! `state_db`), so it cannot grow with the number of requests. While it checkpoints,
//! writes queue up for it, and it commits them after, in one transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::store::state_db::{Change, StateDb};

/// What a commit's result is handed to: one result per change (see [`StateDb::commit`]),
/// or why none was saved.
type Saved = Result<Vec<i64>, String>;

/// What is done with a write's result right after the commit, by whoever made it (see
/// [`Journal::write_then`]).
type Done = Box<dyn FnOnce(Saved) + Send>;

/// One caller's changes, and what is done with their result.
struct Write {
    changes: Vec<Change>,
    done: Done,
}

/// What the journal thread is asked to do.
enum Job {
    Write(Vec<Write>),
    /// Copy the WAL into the database (commits made in place ask for it every
    /// [`CHECKPOINT_EVERY`]), so the WAL is reset instead of growing.
    Checkpoint,
}

/// Commits between checkpoints.
const CHECKPOINT_EVERY: usize = 1000;

pub struct Journal {
    db: Arc<Mutex<StateDb>>,
    queue: mpsc::Sender<Job>,
    /// Writes gathered on the event loop for the next commit made in place.
    gathered: Mutex<Vec<Write>>,
    /// Writes sent to the journal thread and not committed yet: while there are any, later
    /// writes go there too, behind them.
    queued: Arc<AtomicUsize>,
    /// Commits made in place since the last checkpoint was asked for.
    in_place: AtomicUsize,
    /// Commits made, and writes made (`/metrics`: how well commits are shared).
    pub commits: Arc<AtomicUsize>,
    pub writes: AtomicUsize,
}

/// The first write of a commit in place, waiting for the event loop's other ready
/// requests to add theirs. Dropped, it commits what was gathered: a request cancelled
/// while it waits (its client went away) strands neither the others nor its own write.
struct Gathering<'a> {
    journal: &'a Journal,
}

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        self.journal.commit_gathered();
    }
}

impl Journal {
    /// Starts the thread that commits queued changes and checkpoints.
    pub fn start(db: StateDb) -> Journal {
        let db = Arc::new(Mutex::new(db));
        let (queue, pending) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let commits = Arc::new(AtomicUsize::new(0));
        let thread = (Arc::clone(&db), Arc::clone(&queued), Arc::clone(&commits));
        std::thread::Builder::new()
            .name("renv-journal".into())
            .spawn(move || {
                let (db, queued, commits) = thread;
                let mut since_checkpoint = 0usize;
                loop {
                    let mut batch = match pending.recv_timeout(Duration::from_secs(1)) {
                        Ok(Job::Write(writes)) => writes,
                        Ok(Job::Checkpoint) | Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = db.lock().unwrap().checkpoint();
                            since_checkpoint = 0;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    let mut checkpoint = false;
                    for job in pending.try_iter() {
                        match job {
                            Job::Write(writes) => batch.extend(writes),
                            Job::Checkpoint => checkpoint = true,
                        }
                    }
                    let count = batch.len();
                    let answers = commit(&mut db.lock().unwrap(), batch);
                    commits.fetch_add(1, Ordering::Relaxed);
                    queued.fetch_sub(count, Ordering::AcqRel);
                    answers.answer();
                    since_checkpoint += 1;
                    if checkpoint || since_checkpoint >= CHECKPOINT_EVERY {
                        let _ = db.lock().unwrap().checkpoint();
                        since_checkpoint = 0;
                    }
                }
            })
            .expect("the journal thread starts");
        Journal {
            db,
            queue,
            gathered: Mutex::new(Vec::new()),
            queued,
            in_place: AtomicUsize::new(0),
            commits,
            writes: AtomicUsize::new(0),
        }
    }

    /// Commits `changes` (all or none); returns one result per change (see
    /// [`StateDb::commit`]).
    pub async fn write(&self, changes: Vec<Change>) -> Result<Vec<i64>, String> {
        self.write_then(changes, |saved| saved).await?
    }

    /// Commits `changes` (all or none), then hands the result to `then` and returns what
    /// it returns. `then` runs right after the commit, by whoever made it, whether or not
    /// this caller still waits (its client may have gone away): what must follow a saved
    /// change, such as counting a saved reference in memory, is done there, so it is never
    /// saved and left undone.
    pub async fn write_then<T: Send + 'static>(
        &self,
        changes: Vec<Change>,
        then: impl FnOnce(Saved) -> T + Send + 'static,
    ) -> Result<T, String> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let write = Write {
            changes,
            done: Box::new(move |saved| {
                let _ = reply.send(then(saved));
            }),
        };
        let first = {
            let mut gathered = self.gathered.lock().unwrap();
            gathered.push(write);
            gathered.len() == 1
        };
        if first {
            let gathering = Gathering { journal: self };
            after_ready_tasks().await;
            drop(gathering);
        }
        answer
            .await
            .map_err(|_| "the state journal has stopped".to_string())
    }

    /// Commits `changes` on the journal thread, behind what is queued there, and does not
    /// wait: for what must be saved though no one waits for it. A failure is logged as
    /// `unsaved`.
    pub fn write_detached(&self, changes: Vec<Change>, unsaved: &'static str) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let write = Write {
            changes,
            done: Box::new(move |saved| {
                if let Err(e) = saved {
                    tracing::warn!(error = %e, "{unsaved}");
                }
            }),
        };
        self.send(vec![write]);
    }

    /// Hands `writes` to the journal thread.
    fn send(&self, writes: Vec<Write>) {
        self.queued.fetch_add(writes.len(), Ordering::AcqRel);
        if let Err(mpsc::SendError(Job::Write(writes))) = self.queue.send(Job::Write(writes)) {
            self.queued.fetch_sub(writes.len(), Ordering::AcqRel);
            for write in writes {
                (write.done)(Err("the state journal has stopped".to_string()));
            }
        }
    }

    /// Commits what was gathered, in place unless the journal thread has writes still to
    /// commit or is checkpointing (then behind them, there).
    fn commit_gathered(&self) {
        let writes = std::mem::take(&mut *self.gathered.lock().unwrap());
        if writes.is_empty() {
            return;
        }
        if self.queued.load(Ordering::Acquire) == 0
            && let Ok(mut db) = self.db.try_lock()
        {
            let answers = commit(&mut db, writes);
            drop(db);
            self.commits.fetch_add(1, Ordering::Relaxed);
            if self.in_place.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_EVERY {
                self.in_place.store(0, Ordering::Relaxed);
                let _ = self.queue.send(Job::Checkpoint);
            }
            answers.answer();
            return;
        }
        self.send(writes);
    }
}

/// Returns once the tasks that were ready to run when it was awaited have run: the task
/// wakes itself and goes to the back of the loop's queue. (Unlike `yield_now`, without a
/// poll of the loop's I/O first: a lone request is not made to wait for one.)
async fn after_ready_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Results of one commit, to be handed on once the database is let go.
struct Answers(Vec<(Done, Saved)>);

impl Answers {
    fn answer(self) {
        for (done, saved) in self.0 {
            done(saved);
        }
    }
}

/// Commits each write's changes in one transaction (a write that fails fails alone).
fn commit(db: &mut StateDb, writes: Vec<Write>) -> Answers {
    let changes: Vec<&[Change]> = writes.iter().map(|w| w.changes.as_slice()).collect();
    let results = match db.commit_batches(&changes) {
        Ok(results) => results,
        Err(e) => vec![Err(e.to_string()); writes.len()],
    };
    drop(changes);
    Answers(writes.into_iter().map(|w| w.done).zip(results).collect())
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::store::layout::Layout;

    fn journal() -> (tempfile::TempDir, Layout, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.state_db_path().parent().unwrap()).unwrap();
        let journal = Journal::start(StateDb::open(&layout).unwrap());
        (dir, layout, journal)
    }

    fn reference(env_id: &str) -> Vec<Change> {
        vec![Change::AddRef {
            env_id: env_id.into(),
            uid: 1000,
            tag: None,
        }]
    }

    /// Polls once, as the event loop would.
    fn poll<F: Future + ?Sized>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(Waker::noop()))
    }

    fn saved_refs(layout: &Layout) -> Vec<i64> {
        let saved = StateDb::open(layout).unwrap().load().unwrap();
        saved.refs.iter().map(|r| r.id).collect()
    }

    /// Writes made while the loop runs its other ready tasks share one commit, and each
    /// is answered only then, with ids of its own.
    #[test]
    fn writes_made_together_share_one_commit() {
        let (_dir, layout, journal) = journal();
        let mut writes: Vec<_> = (0..5).map(|_| Box::pin(journal.write(reference("e1")))).collect();
        for write in &mut writes {
            assert!(poll(write.as_mut()).is_pending());
        }
        assert_eq!(
            journal.commits.load(Ordering::Relaxed),
            0,
            "nothing committed yet"
        );
        assert!(saved_refs(&layout).is_empty());
        // The first, run again once the others had their turn, commits them all.
        let ids: Vec<i64> = writes
            .iter_mut()
            .map(|write| match poll(write.as_mut()) {
                Poll::Ready(Ok(ids)) => ids[0],
                other => panic!("not answered: {other:?}"),
            })
            .collect();
        assert_eq!(journal.commits.load(Ordering::Relaxed), 1);
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(saved_refs(&layout), ids);
        // A lone write is committed at its next turn.
        let mut alone = Box::pin(journal.write(reference("e1")));
        assert!(poll(alone.as_mut()).is_pending());
        assert!(matches!(poll(alone.as_mut()), Poll::Ready(Ok(ids)) if ids == vec![6]));
    }

    /// A write whose caller goes away is committed all the same, and what follows its
    /// commit is done: the first write's caller cancelled while the others joined it
    /// strands none of them, and a caller gone before its answer still has its
    /// reference counted.
    #[test]
    fn writes_whose_callers_went_away_are_committed_and_followed_up() {
        let (_dir, layout, journal) = journal();
        let counted = Arc::new(Mutex::new(Vec::new()));
        let count = |counted: &Arc<Mutex<Vec<i64>>>| {
            let counted = Arc::clone(counted);
            move |saved: Saved| counted.lock().unwrap().push(saved.unwrap()[0])
        };
        let mut first = Box::pin(journal.write_then(reference("e1"), count(&counted)));
        let mut second = Box::pin(journal.write_then(reference("e1"), count(&counted)));
        let mut third = Box::pin(journal.write(reference("e2")));
        assert!(poll(first.as_mut()).is_pending());
        assert!(poll(second.as_mut()).is_pending());
        assert!(poll(third.as_mut()).is_pending());
        drop(first);
        assert_eq!(*counted.lock().unwrap(), vec![1, 2], "committed, and counted");
        drop(second);
        assert!(matches!(poll(third.as_mut()), Poll::Ready(Ok(ids)) if ids == vec![3]));
        assert_eq!(journal.commits.load(Ordering::Relaxed), 1);
        assert_eq!(saved_refs(&layout), vec![1, 2, 3]);
    }
}
