//! The source's first connection, made in the background while the mount
//! already serves: `lazyfs mount` returns once the local side is ready, and
//! the connection (an `ssh` started, keys exchanged, authenticated) comes up
//! beside `criu restore`. A reader waits for it within its deadline; the other
//! lanes connect only once it is up, so a refused key is met once, not by
//! every lane. A first connection that fails (unreachable, host key,
//! authentication) is final for this mount, as it was for `lazyfs mount`
//! before: readers of missing bytes get EIO at once, status and `wait` say
//! why, the log too.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::source::{Connection, Source, SourceError};

pub(crate) struct FirstConnection {
    source: Arc<dyn Source>,
    state: Mutex<State>,
    changed: Condvar,
}

enum State {
    /// Not asked for: nothing needed the source when the mount started.
    Idle,
    Connecting,
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
        FirstConnection { source, state: Mutex::new(state), changed: Condvar::new() }
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
        *state = State::Connecting;
        let this = self.clone();
        let spawned = std::thread::Builder::new().name("lazyfs-connect".into()).spawn(move || {
            let started = Instant::now();
            let outcome = match this.source.connect() {
                Ok(connection) => {
                    log::info!("connected to {} in {:.3} s", this.source.describe(), started.elapsed().as_secs_f64());
                    State::Up(Some(connection))
                }
                Err(e) => {
                    log::error!("{e}: only what is here already is served; `lazyfs umount`, then mount again");
                    State::Failed(e.to_string().into())
                }
            };
            *this.lock() = outcome;
            this.changed.notify_all();
        });
        if let Err(e) = spawned {
            *state = State::Failed(format!("cannot start connecting: {e}").into());
        }
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
        loop {
            match &mut *state {
                State::Up(connection) => return Ok(if take { connection.take() } else { None }),
                State::Failed(reason) => return Err(SourceError::Unusable(reason.clone())),
                State::Idle | State::Connecting => {
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

    /// Why the source cannot be used, if its first connection failed.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        match &*self.lock() {
            State::Failed(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}
