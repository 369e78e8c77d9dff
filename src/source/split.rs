//! Each SSH transport where it wins (`--ssh auto`, when both can serve the
//! host): connections a reader waits for go through libssh2, in process (a
//! session in about a tenth of the time a new `ssh` takes to start, exchange
//! keys and authenticate here); bulk transfers go through the system's `ssh`,
//! whose client decrypts faster, on another core, at a lower priority. See
//! README "SSH transports".
//!
//! The host key is checked by both against the same known_hosts. A key or an
//! agent that only `ssh` can use (libssh2 refuses it) is found out at the first
//! connection: from then on every connection goes through `ssh`. The `ssh`
//! side is set up (`ssh -G`) only when it is first needed, off the mount's path.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::openssh::OpensshSource;
use super::ssh::SshSource;
use super::{Connection, Source, SourceError, SshOptions};

pub struct SplitSource {
    quick: SshSource,
    options: SshOptions,
    root: PathBuf,
    /// The `ssh` side, once first needed; `None` if `ssh` could not be set
    /// up for the host (then libssh2 carries everything).
    bulk: OnceLock<Option<OpensshSource>>,
    /// libssh2 could not authenticate where `ssh` did: `ssh` for everything.
    bulk_only: AtomicBool,
}

impl SplitSource {
    pub fn new(options: SshOptions, root: PathBuf) -> Result<SplitSource, SourceError> {
        let quick = SshSource::new(options.clone(), &root)?;
        Ok(SplitSource { quick, options, root, bulk: OnceLock::new(), bulk_only: AtomicBool::new(false) })
    }

    fn bulk(&self) -> Option<&OpensshSource> {
        self.bulk
            .get_or_init(|| match OpensshSource::new(self.options.clone(), &self.root) {
                Ok(bulk) => Some(bulk.for_background()),
                Err(e) => {
                    log::warn!("{e}: bulk transfers go through libssh2 too");
                    None
                }
            })
            .as_ref()
    }
}

impl Source for SplitSource {
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        if self.bulk_only.load(Ordering::Relaxed) {
            return self.connect_bulk_within(time);
        }
        match self.quick.connect_within(time) {
            Err(refused @ SourceError::Auth { .. }) => {
                let bulk = self.bulk().ok_or(refused.again())?;
                let connection = bulk.connect_within(time).map_err(|_| refused)?;
                log::info!("libssh2 could not authenticate where ssh can: every session goes through ssh");
                self.bulk_only.store(true, Ordering::Relaxed);
                Ok(connection)
            }
            other => other,
        }
    }

    fn connect_bulk_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        match self.bulk() {
            Some(bulk) => bulk.connect_within(time),
            None => self.quick.connect_within(time),
        }
    }

    fn describe(&self) -> String {
        self.quick.describe()
    }

    fn idle(&self) {
        self.quick.idle();
        if let Some(Some(bulk)) = self.bulk.get() {
            bulk.idle();
        }
    }
}
