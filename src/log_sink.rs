//! Where a mount's log lines go: its cache dir's `lazyfs.log`. Until the
//! inputs are checked and the cache dir is there, they are held in memory
//! (a mount that fails first makes no cache dir), then written into it.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use crate::store::{CacheDir, StoreError};

enum Sink {
    Stderr,
    Held(Vec<u8>),
    File(File),
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);

/// What [`Writer`] does with a line now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Stderr,
    /// Kept until the cache dir is known.
    Held,
    /// In the cache dir's log.
    File,
}

/// The log's target for `env_logger`: stderr until [`hold`], then held,
/// then the cache dir's log once [`into_cache_dir`].
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut *SINK.lock().expect("log sink") {
            Sink::Stderr => std::io::stderr().write_all(bytes)?,
            Sink::Held(held) => held.extend_from_slice(bytes),
            Sink::File(file) => file.write_all(bytes)?,
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lines are held from now on.
pub fn hold() {
    *SINK.lock().expect("log sink") = Sink::Held(Vec::new());
}

pub fn state() -> State {
    match &*SINK.lock().expect("log sink") {
        Sink::Stderr => State::Stderr,
        Sink::Held(_) => State::Held,
        Sink::File(_) => State::File,
    }
}

/// From now on the log goes to `dir`'s lazyfs.log, what was held first;
/// with `as_stderr`, so does this process's stderr (what a panic says).
pub fn into_cache_dir(dir: &CacheDir, as_stderr: bool) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: dir.join("lazyfs.log"), source };
    let mut file = dir.open_append("lazyfs.log")?;
    let mut sink = SINK.lock().expect("log sink");
    if let Sink::Held(held) = &*sink {
        file.write_all(held).map_err(io)?;
    }
    if as_stderr {
        nix::unistd::dup2_stderr(&file).map_err(|e| io(e.into()))?;
    }
    *sink = Sink::File(file);
    Ok(())
}
