//! The source's first connection, made in the background while the mount
//! already serves: `lazyfs mount` returns once the local side is ready, and
//! the connection (an `ssh` started, keys exchanged, authenticated) comes up
//! beside `criu restore`. A reader waits for it within its deadline; the other
//! lanes connect only once it is up, so a refused key is met once, not by
//! every lane. A source that refuses lazyfs (host key, authentication, an ssh
//! config lazyfs cannot follow) is refused for this mount at once: readers of
//! missing bytes get EIO, status and `wait` (exit 1) say why, the log too. A
//! source that does not answer is tried again, as a lost connection is:
//! status says why meanwhile, readers get EIO once `--reconnect-timeout` has
//! passed, and bytes once it answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::source::{Connection, Source, SourceError};

pub(crate) struct FirstConnection {
    source: Arc<dyn Source>,
    state: Mutex<State>,
    changed: Condvar,
    /// The fetcher is stopping: no more tries.
    stopping: AtomicBool,
}

/// Pauses between tries of a source that does not answer: 0.1 s doubling to 5 s.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

enum State {
    /// Not asked for: nothing needed the source when the mount started.
    Idle,
    /// Being made; the last try's error, if one failed.
    Connecting(Option<String>),
    /// Up; the connection itself until the first on-demand lane takes it.
    Up(Option<Box<dyn Connection>>),
    /// Why the source cannot be used.
    Failed(Arc<str>),
}

impl FirstConnection {
    /// Up already with `connection` (`--wait-for-source`), or idle.
    pub(crate) fn new(source: Arc<dyn Source>, connection: Option<Box<dyn Connection>>) -> FirstConnection {
        let state = match connection {
            Some(connection) => State::Up(Some(connection)),
            None => State::Idle,
        };
        FirstConnection { source, state: Mutex::new(state), changed: Condvar::new(), stopping: AtomicBool::new(false) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts connecting in the background, unless that was done already.
    pub(crate) fn start(self: &Arc<Self>) {
        let mut state = self.lock();
        if !matches!(*state, State::Idle) {
            return;
        }
        *state = State::Connecting(None);
        let this = self.clone();
        let spawned = std::thread::Builder::new().name("lazyfs-connect".into()).spawn(move || this.connect());
        if let Err(e) = spawned {
            *state = State::Failed(format!("cannot start connecting: {e}").into());
        }
    }

    /// Connects, trying again with growing pauses while the source does not
    /// answer; a refusal is final.
    fn connect(&self) {
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let outcome = loop {
            match self.source.connect() {
                Ok(connection) => {
                    let took = started.elapsed().as_secs_f64();
                    log::info!("connected to {} in {took:.3} s", self.source.describe());
                    break State::Up(Some(connection));
                }
                Err(e) if e.is_connection_lost() && !self.stopping.load(Ordering::Relaxed) => {
                    let mut state = self.lock();
                    if matches!(*state, State::Connecting(None)) {
                        log::warn!("{e}: trying again until it answers");
                    }
                    *state = State::Connecting(Some(e.to_string()));
                    // A reader that comes to wait cuts the pause short (see `wait`).
                    let waited = self.changed.wait_timeout(state, pause).unwrap_or_else(PoisonError::into_inner).1;
                    pause = match waited.timed_out() {
                        true => (pause * 2).min(LONGEST_PAUSE),
                        false => {
                            std::thread::sleep(FIRST_PAUSE);
                            FIRST_PAUSE
                        }
                    };
                }
                Err(e) => {
                    log::error!("{e}: only what is here already is served; `lazyfs umount`, then mount again");
                    break State::Failed(e.to_string().into());
                }
            }
        };
        *self.lock() = outcome;
        self.changed.notify_all();
    }

    /// Closes the first connection if no lane took it (the source is not needed).
    pub(crate) fn release(&self) {
        if let State::Up(connection) = &mut *self.lock() {
            *connection = None;
        }
    }

    /// No more tries (the fetcher is stopping).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Waits (until `deadline`) for the source to be up: the first
    /// connection itself if `take` and no lane took it yet, or `None` (then
    /// connect anew). An error if it failed, or is not up in time.
    pub(crate) fn wait(
        self: &Arc<Self>,
        deadline: Instant,
        take: bool,
    ) -> Result<Option<Box<dyn Connection>>, SourceError> {
        self.start();
        let mut state = self.lock();
        if matches!(*state, State::Connecting(Some(_))) {
            // Tried and failed before: the reader need not wait out the pause.
            self.changed.notify_all();
        }
        loop {
            match &mut *state {
                State::Up(connection) => return Ok(if take { connection.take() } else { None }),
                State::Failed(reason) => return Err(SourceError::Unusable(reason.clone())),
                State::Idle | State::Connecting(_) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let host = self.source.describe();
                        return Err(SourceError::TimedOut { host, waited: Duration::ZERO, path: None });
                    }
                    state = self.changed.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
                }
            }
        }
    }

    /// Why the source cannot be used, if it refused the first connection.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        match &*self.lock() {
            State::Failed(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Why the first connection is not up yet, while it is tried again.
    pub(crate) fn retrying(&self) -> Option<String> {
        match &*self.lock() {
            State::Connecting(Some(error)) => Some(format!("{error}; trying again")),
            _ => None,
        }
    }
}
