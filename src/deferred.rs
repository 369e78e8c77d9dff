//! Work that waits (for a listing of the tree) done off the FUSE session's
//! threads: a pool of threads, started as they are needed up to a bound and
//! ended after a while idle. Jobs beyond the bound queue: the session's
//! threads never block on them, and no burst of waiting lookups starts a
//! thread each.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How long a thread of the pool waits for work before it ends.
const IDLE: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send>;

pub struct Deferred {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// Threads at most.
    max: usize,
    name: &'static str,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads alive, and those of them waiting for a job.
    threads: usize,
    waiting: usize,
}

impl Deferred {
    /// A pool of up to `max` threads named `name`.
    pub fn new(max: usize, name: &'static str) -> Deferred {
        let shared = Shared { state: Mutex::default(), work: Condvar::new(), max: max.max(1), name };
        Deferred { shared: Arc::new(shared) }
    }

    /// Runs `job` on a thread of the pool, as soon as one is free.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let shared = &self.shared;
        let mut state = shared.lock();
        state.jobs.push_back(Box::new(job));
        if state.jobs.len() <= state.waiting {
            shared.work.notify_one();
            return;
        }
        if state.threads >= shared.max {
            // Queued: the next thread to finish takes it.
            return;
        }
        let worker = shared.clone();
        match std::thread::Builder::new().name(shared.name.into()).spawn(move || worker.serve()) {
            Ok(_) => state.threads += 1,
            Err(e) if state.threads == 0 => {
                // No thread to run it at all: run it here rather than never.
                log::error!("starting a thread for work that waits: {e}: done on the caller's thread");
                let job = state.jobs.pop_back().expect("pushed above");
                drop(state);
                job();
            }
            Err(e) => log::warn!("starting a thread for work that waits: {e}: it queues"),
        }
    }

    /// Threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                // A job that panics loses its answer, not the thread.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                    log::error!("work that waited panicked: {}", crate::fetch::panic_message(panic.as_ref()));
                }
                state = self.lock();
                continue;
            }
            state.waiting += 1;
            let (next, waited) = self.work.wait_timeout(state, IDLE).unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.waiting -= 1;
            if waited.timed_out() && state.jobs.is_empty() {
                state.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_beyond_the_bound_queue_and_all_run() {
        let pool = Deferred::new(3, "test-deferred");
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (done_tx, done) = std::sync::mpsc::channel();
        for i in 0..10 {
            let (gate, done_tx) = (gate.clone(), done_tx.clone());
            pool.run(move || {
                let mut open = gate.0.lock().unwrap();
                while !*open {
                    open = gate.1.wait(open).unwrap();
                }
                done_tx.send(i).unwrap();
            });
        }
        assert_eq!(pool.threads(), 3, "ten waiting jobs, three threads");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let mut ran: Vec<i32> = (0..10).map(|_| done.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        ran.sort();
        assert_eq!(ran, (0..10).collect::<Vec<_>>());
    }
}
