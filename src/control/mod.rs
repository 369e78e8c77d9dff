//! How `lazyfs status`, `wait` and `umount` talk to a mount's background
//! process: protobuf messages (`proto/lazyfs/control.proto`), length-delimited,
//! over a unix socket (mode 0600) in the mount's cache dir, and a registry of
//! live mounts so a command can find them by mountpoint.

pub mod registry;
mod server;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/lazyfs.control.rs"));
}

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use prost::Message;
pub use server::{ControlEvent, LocateHook, PrefetchHook, Server, StatusHook, umount_done, upgrade_answer};

use proto::{FileState, MountState, Request, Response, request, response};

impl MountState {
    /// The word `lazyfs status` shows.
    pub fn word(self) -> &'static str {
        match self {
            MountState::Fetching => "fetching",
            MountState::Complete => "complete",
            MountState::Degraded => "degraded",
            MountState::Failed => "failed",
        }
    }
}

impl FileState {
    /// The word `lazyfs status` shows.
    pub fn word(self) -> &'static str {
        match self {
            FileState::Pending => "pending",
            FileState::Fetching => "fetching",
            FileState::Present => "present",
            FileState::Verified => "verified",
            FileState::Modified => "modified",
            FileState::Failed => "failed",
        }
    }
}

/// No control message comes near this; a larger length is a broken peer.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: not a lazyfs mount (no live lazyfs process serves it)", .0.display())]
    NotAMount(PathBuf),
    #[error("{}: no such directory", .0.display())]
    NoSuchDirectory(PathBuf),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: served by uid {uid}, not by this user: refused (not a lazyfs process of yours)", path.display())]
    Impostor { path: PathBuf, uid: u32 },
    #[error("{}: the lazyfs process answered: {message}", path.display())]
    Refused { path: PathBuf, message: String },
    #[error("{}: the lazyfs process sent a malformed message: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
}

pub fn write_message(stream: &mut impl Write, message: &impl Message) -> std::io::Result<()> {
    stream.write_all(&message.encode_length_delimited_to_vec())
}

/// Reads one length-delimited message; `None` at a clean end of stream.
pub fn read_message<M: Message + Default>(stream: &mut impl Read) -> std::io::Result<Option<M>> {
    let mut len: usize = 0;
    for i in 0..10 {
        let mut byte = [0u8];
        match stream.read(&mut byte)? {
            0 if i == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {}
        }
        len |= usize::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            if len > MAX_MESSAGE {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message too large"));
            }
            let mut body = vec![0; len];
            stream.read_exact(&mut body)?;
            return M::decode(body.as_slice())
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad length prefix"))
}

/// A connection to one mount's background process.
pub struct Client {
    mountpoint: PathBuf,
    stream: UnixStream,
    /// The mount's supervisor, as its registry entry says (0: none).
    supervisor: u32,
}

impl Client {
    /// Connects to the process serving `mountpoint`.
    pub fn connect(mountpoint: &Path) -> Result<Client, ControlError> {
        let entry = registry::find(mountpoint).ok_or_else(|| match std::fs::symlink_metadata(mountpoint) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ControlError::NoSuchDirectory(mountpoint.into()),
            _ => ControlError::NotAMount(mountpoint.to_path_buf()),
        })?;
        let stream =
            UnixStream::connect(&entry.socket).map_err(|_| ControlError::NotAMount(mountpoint.to_path_buf()))?;
        // Only a process of this user speaks for a mount of this user.
        let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(|e| ControlError::Io { path: entry.socket.clone(), source: e.into() })?;
        if peer.uid() != nix::unistd::geteuid().as_raw() {
            return Err(ControlError::Impostor { path: entry.socket, uid: peer.uid() });
        }
        Ok(Client { mountpoint: entry.mountpoint, stream, supervisor: entry.supervisor })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The pid of the mount's supervisor (0: none, `mount -f`).
    pub fn supervisor(&self) -> u32 {
        self.supervisor
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
        |source| ControlError::Io { path: self.mountpoint.clone(), source }
    }

    fn send(&mut self, kind: request::Kind) -> Result<(), ControlError> {
        let request = Request { kind: Some(kind) };
        write_message(&mut self.stream, &request)
            .map_err(|source| ControlError::Io { path: self.mountpoint.clone(), source })
    }

    /// The next response; a process that hung up is not a mount any more.
    pub fn receive(&mut self) -> Result<response::Kind, ControlError> {
        let response: Option<Response> = read_message(&mut self.stream).map_err(self.io())?;
        match response.and_then(|r| r.kind) {
            Some(response::Kind::Error(message)) => {
                Err(ControlError::Refused { path: self.mountpoint.clone(), message })
            }
            Some(kind) => Ok(kind),
            None => Err(ControlError::NotAMount(self.mountpoint.clone())),
        }
    }

    pub fn status(&mut self) -> Result<proto::Status, ControlError> {
        self.status_of(false)
    }

    /// A snapshot without the per-file list.
    pub fn totals(&mut self) -> Result<proto::Status, ControlError> {
        self.status_of(true)
    }

    fn status_of(&mut self, totals_only: bool) -> Result<proto::Status, ControlError> {
        self.send(request::Kind::Status(proto::StatusRequest { totals_only }))?;
        match self.receive()? {
            response::Kind::Status(status) => Ok(status),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }

    /// Starts a stream of snapshots; read them with [`Client::next_status`].
    pub fn watch(&mut self, interval_ms: u32) -> Result<(), ControlError> {
        self.send(request::Kind::Watch(proto::WatchRequest { interval_ms }))
    }

    pub fn next_status(&mut self) -> Result<proto::Status, ControlError> {
        match self.receive()? {
            response::Kind::Status(status) => Ok(status),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }

    /// Starts background prefetch of the files with these original paths
    /// (every file when empty); returns how many still had bytes to fetch.
    pub fn prefetch(&mut self, paths: Vec<Vec<u8>>) -> Result<u64, ControlError> {
        self.send(request::Kind::Prefetch(proto::PrefetchRequest { paths }))?;
        match self.receive()? {
            response::Kind::Prefetch(started) => Ok(started.files_queued),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }

    /// Has the mount list the directories on the way to these paths
    /// (original, or below the mountpoint); returns once they are listed.
    pub fn locate(&mut self, paths: Vec<Vec<u8>>) -> Result<(), ControlError> {
        self.send(request::Kind::Locate(proto::LocateRequest { paths }))?;
        match self.receive()? {
            response::Kind::Located(_) => Ok(()),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }

    /// Asks the mount to hand over to `binary`; returns once its supervisor agreed.
    pub fn upgrade(&mut self, binary: &Path) -> Result<(), ControlError> {
        use std::os::unix::ffi::OsStrExt;
        let binary = binary.as_os_str().as_bytes().to_vec();
        self.send(request::Kind::Upgrade(proto::UpgradeRequest { binary }))?;
        match self.receive()? {
            response::Kind::Upgrade(_) => Ok(()),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }

    /// Unmounts and waits until the process has flushed its state.
    pub fn umount(&mut self) -> Result<(), ControlError> {
        self.send(request::Kind::Umount(proto::UmountRequest {}))?;
        match self.receive()? {
            response::Kind::Umount(_) => Ok(()),
            other => Err(ControlError::Protocol { path: self.mountpoint.clone(), reason: format!("{other:?}") }),
        }
    }
}
