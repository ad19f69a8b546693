//! One build per key inside a process: the first caller builds, every concurrent caller
//! for the same key waits and gets the same result, failure included. The flight is
//! forgotten once it lands, so a later call re-checks the store (and retries a failure).
//!
//! Entry locks already let one thread at a time build an entry; what this adds is that
//! waiters share the leader's *failure* instead of each repeating a build that fails
//! (an env whose index times out would otherwise cost every waiter the whole deadline).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

struct Flight<V> {
    /// `None` while running; `Some(None)` if the leader panicked.
    result: Mutex<Option<Option<V>>>,
    landed: Condvar,
}

pub struct SingleFlight<K, V> {
    flights: Mutex<HashMap<K, Arc<Flight<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `work` unless a call for `key` is already in flight, in which case it waits
    /// for that call's result. Returns the result and whether this call did the work.
    pub fn run(&self, key: K, work: impl FnOnce() -> V) -> (V, bool) {
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(&key) {
                Some(flight) => (Arc::clone(flight), false),
                None => {
                    let flight = Arc::new(Flight {
                        result: Mutex::new(None),
                        landed: Condvar::new(),
                    });
                    flights.insert(key.clone(), Arc::clone(&flight));
                    (flight, true)
                }
            }
        };
        if !leader {
            let mut result = flight.result.lock().unwrap();
            while result.is_none() {
                result = flight.landed.wait(result).unwrap();
            }
            let value = result.clone().expect("landed");
            return (value.expect("the build this call waited for panicked"), false);
        }
        // A panicking leader still lands its flight, so waiters never hang.
        let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        self.flights.lock().unwrap().remove(&key);
        *flight.result.lock().unwrap() = Some(value.as_ref().ok().cloned());
        flight.landed.notify_all();
        match value {
            Ok(value) => (value, true),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_one_run_and_its_failure() {
        let flights: SingleFlight<&str, Result<u32, String>> = SingleFlight::default();
        let runs = AtomicUsize::new(0);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        flights.run("k", || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Err("boom".to_string())
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, leader)| *leader).count(), 1);
        assert!(results.iter().all(|(r, _)| r == &Err("boom".to_string())));
        // Landed flights are forgotten: the next call runs again.
        let (again, leader) = flights.run("k", || Ok(1));
        assert_eq!((again, leader), (Ok(1), true));
    }
}
