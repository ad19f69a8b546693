//! Progress for long steps (hashing, copying, unpacking), drawn on stderr only when it is
//! a terminal. Counting is an atomic add, so the hot loops pay nothing when it is off.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    /// Draws progress when stderr is a terminal.
    pub fn for_stderr() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn hidden() -> Self {
        Progress { enabled: false }
    }

    pub fn phase(&self, label: &'static str, total: u64) -> Phase {
        let state = Arc::new(PhaseState {
            done: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        });
        let drawer = self.enabled.then(|| {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                // Only draw steps that take long enough to notice.
                std::thread::sleep(Duration::from_millis(250));
                let mut drew = false;
                while !state.finished.load(Ordering::Relaxed) {
                    let done = state.done.load(Ordering::Relaxed);
                    eprint!("\r\x1b[2K{label} {done}/{total}");
                    drew = true;
                    std::thread::sleep(Duration::from_millis(100));
                }
                if drew {
                    eprint!("\r\x1b[2K");
                    let _ = std::io::stderr().flush();
                }
            })
        });
        Phase { state, drawer }
    }
}

struct PhaseState {
    done: AtomicU64,
    finished: AtomicBool,
}

pub struct Phase {
    state: Arc<PhaseState>,
    drawer: Option<std::thread::JoinHandle<()>>,
}

impl Phase {
    pub fn inc(&self, n: u64) {
        self.state.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.state.finished.store(true, Ordering::Relaxed);
        if let Some(drawer) = self.drawer.take() {
            let _ = drawer.join();
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.stop();
    }
}
