//! Each SSH transport where it wins (`--ssh auto`, when both can serve the
//! host): connections a reader waits for go through libssh2, in process (a
//! session in about a tenth of the time a new `ssh` takes to start, exchange
//! keys and authenticate here); bulk transfers go through the system's `ssh`,
//! whose client decrypts faster, on another core. See README "SSH transports".
//!
//! The host key is checked by both against the same known_hosts. A key or an
//! agent that only `ssh` can use (libssh2 refuses it) is found out at the first
//! connection: from then on every connection goes through `ssh`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::openssh::OpensshSource;
use super::ssh::SshSource;
use super::{Connection, Source, SourceError};

pub struct SplitSource {
    quick: SshSource,
    bulk: OpensshSource,
    /// libssh2 could not authenticate where `ssh` did: `ssh` for everything.
    bulk_only: AtomicBool,
}

impl SplitSource {
    pub fn new(quick: SshSource, bulk: OpensshSource) -> SplitSource {
        SplitSource { quick, bulk: bulk.for_background(), bulk_only: AtomicBool::new(false) }
    }
}

impl Source for SplitSource {
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        if self.bulk_only.load(Ordering::Relaxed) {
            return self.bulk.connect_within(time);
        }
        match self.quick.connect_within(time) {
            Err(refused @ SourceError::Auth { .. }) => {
                let connection = self.bulk.connect_within(time).map_err(|_| refused)?;
                log::info!("libssh2 could not authenticate where ssh can: every session goes through ssh");
                self.bulk_only.store(true, Ordering::Relaxed);
                Ok(connection)
            }
            other => other,
        }
    }

    fn connect_bulk_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        self.bulk.connect_within(time)
    }

    fn describe(&self) -> String {
        self.bulk.describe()
    }

    fn idle(&self) {
        self.quick.idle();
        self.bulk.idle();
    }
}
