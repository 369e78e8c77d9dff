//! Failover: a mount outlives the process serving it. A small supervisor
//! (the background process `lazyfs mount` starts) holds the mount's
//! `/dev/fuse` descriptor and starts the serving process; when that dies
//! (`kill -9`, a panic, the OOM killer) or `lazyfs upgrade` replaces it, a new
//! one takes the same kernel connection over: it rebuilds the filesystem from
//! the cache dir as a remount does, learns the open handles from the
//! connection's open table, and asks the kernel to send again the requests
//! its predecessor took but never answered (`FUSE_NOTIFY_RESEND`).

pub mod link;
pub mod opens;
pub mod supervisor;

/// The FUSE request a change of the local layer is made for, per thread:
/// the filesystem core stamps the change's journal record with it, so a
/// successor knows which requests the kernel sends again were made already
/// (made twice, a rename would fail: its source is gone). Set by the FUSE
/// adapter around each change; the core knows nothing of FUSE.
pub mod request {
    use std::cell::Cell;

    thread_local! {
        static CURRENT: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
    }

    /// Runs `change` on behalf of request `unique` of connection `connection`.
    pub fn on_behalf_of<T>(connection: u64, unique: u64, change: impl FnOnce() -> T) -> T {
        let before = CURRENT.replace(Some((connection, unique)));
        let result = change();
        CURRENT.set(before);
        result
    }

    /// (connection, request) of the change being made on this thread, if any.
    pub fn current() -> Option<(u64, u64)> {
        CURRENT.get()
    }
}

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use link::{Link, Message, Negotiated, Restarts};
use opens::{Held, OpenTable};

use crate::namespace::Ino;

/// A serving process's side of its supervisor.
pub struct Supervised {
    pub link: Link,
    /// Names this mount's kernel connection in journal records (random).
    pub connection: u64,
    pub restarts: Restarts,
    pub table: OpenTable,
    /// What the kernel holds open (a predecessor's opens, for a successor).
    pub held: HashMap<Ino, Held>,
    /// For a successor: the live connection and what its INIT agreed.
    pub resume: Option<(OwnedFd, Negotiated)>,
}

impl Supervised {
    /// Reads the supervisor's first message from descriptor 3.
    pub fn from_supervisor() -> std::io::Result<Supervised> {
        let broken = |what: &str| std::io::Error::other(format!("the supervisor's link: {what}"));
        let link = Link::inherited().ok_or_else(|| broken("descriptor 3 is not a socket"))?;
        let (message, mut fds) = link.recv()?.ok_or_else(|| broken("closed before the first message"))?;
        let (connection, restarts, negotiated) = match message {
            Message::Start { connection, restarts } if fds.len() == 1 => (connection, restarts, None),
            Message::Resume { connection, restarts, negotiated } if fds.len() == 2 => {
                (connection, restarts, Some(negotiated))
            }
            other => return Err(broken(&format!("unexpected {other:?} with {} descriptors", fds.len()))),
        };
        let resume = negotiated.map(|negotiated| (fds.pop().expect("two descriptors"), negotiated));
        let (table, held) = OpenTable::open(fds.pop().expect("one descriptor"))?;
        Ok(Supervised { link, connection, restarts, table, held, resume })
    }

    /// Open handles per inode, for the filesystem core.
    pub fn open_counts(&self) -> HashMap<Ino, u32> {
        self.held.iter().map(|(&ino, held)| (ino, held.opens())).filter(|&(_, n)| n > 0).collect()
    }
}

/// In a supervised serving process, a panic on a thread serving the kernel
/// (fuser's `fuser-N`) ends the process. Unwound, it would answer its request
/// with EIO and end that thread; once the first thread ended, fuser's
/// session returns as if unmounted and the supervisor, told so, would end
/// with the mount. Aborted, it is a crash like `kill -9`: a successor takes
/// over and the kernel sends it the request again. (Panics contained on
/// purpose, in the fetch lanes, are on other threads.)
pub fn abort_on_fuse_thread_panic() {
    let unwind = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        unwind(info);
        if std::thread::current().name().is_some_and(|name| name.starts_with("fuser-")) {
            log::error!("a thread serving the kernel panicked: ending this process, a successor takes over");
            std::process::abort();
        }
    }));
}
