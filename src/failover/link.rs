//! The supervisor and the process serving its mount talk over a
//! `SOCK_SEQPACKET` socket pair (the server's end is its descriptor 3):
//! JSON messages, each one packet, descriptors riding along (`SCM_RIGHTS`).

use std::io::IoSlice;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

/// Where a serving process finds its end of the link.
pub const SERVER_FD: RawFd = 3;

/// No message comes near this.
const MAX_MESSAGE: usize = 64 << 10;

/// How the mount's serving processes have fared so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarts {
    /// Serving processes started after the first.
    pub count: u32,
    /// Why the last one was started ("" before any).
    pub last_reason: String,
    pub supervisor_pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Supervisor → the first serving process: mount, and say `Mounted`.
    /// `connection` names the mount's kernel connection in journal records.
    /// Descriptor: the connection's open table.
    Start { connection: u64, restarts: Restarts },
    /// Supervisor → a successor: serve the live connection. Descriptors:
    /// the open table, `/dev/fuse`.
    Resume { connection: u64, restarts: Restarts, negotiated: Negotiated },
    /// Serving process → supervisor, once the kernel's INIT is answered.
    /// Descriptor: `/dev/fuse`.
    Mounted { negotiated: Negotiated },
    /// A successor → supervisor: it serves the connection now.
    Serving,
    /// Serving process → supervisor: `lazyfs upgrade` asks `binary` to take over.
    Upgrade { binary: PathBuf },
    /// Supervisor → serving process: the upgrade goes ahead, or why not.
    UpgradeAnswer { refused: Option<String> },
    /// Serving process → supervisor, after an upgrade was agreed: its
    /// clients have their answer; it may be killed now.
    Release,
}

/// What the kernel and the first serving process agreed on at INIT, and the
/// mount it made, which a successor must keep to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub major: u32,
    pub minor: u32,
    /// FUSE passthrough is on.
    pub passthrough: bool,
    /// The mount's device number and mount ID: a successor finds it by them
    /// in the mount table, or knows it detached (`umount -l`), still serving
    /// the files open under it. 0: unknown (a build before these).
    #[serde(default)]
    pub device: u64,
    #[serde(default)]
    pub mount_id: u64,
}

#[derive(Debug)]
pub struct Link {
    socket: OwnedFd,
}

impl Link {
    /// Both ends, close-on-exec (the supervisor moves one to a child's fd 3).
    pub fn pair() -> std::io::Result<(Link, Link)> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((Link { socket: a }, Link { socket: b }))
    }

    /// The serving process's end: its descriptor 3, if it is a socket.
    pub fn inherited() -> Option<Link> {
        let is_socket = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(SERVER_FD) })
            .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK);
        // SAFETY: descriptor 3 was set up by the supervisor for this process
        // and nothing else in it owns the descriptor.
        is_socket.then(|| {
            let socket = unsafe { OwnedFd::from_raw_fd(SERVER_FD) };
            let _ = nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            Link { socket }
        })
    }

    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        sendmsg::<()>(self.socket.as_raw_fd(), &[IoSlice::new(&bytes)], control, MsgFlags::MSG_NOSIGNAL, None)?;
        Ok(())
    }

    /// The next message and its descriptors; `None` once the other end is closed.
    pub fn recv(&self) -> std::io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let (len, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for cmsg in msg.cmsgs()? {
                        if let ControlMessageOwned::ScmRights(received) = cmsg {
                            // SAFETY: the kernel just gave this process these descriptors.
                            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                        }
                    }
                    break (msg.bytes, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len]).map_err(std::io::Error::other)?;
        Ok(Some((message, fds)))
    }

    /// Another handle on this end (one thread receives while another sends).
    pub fn try_clone(&self) -> std::io::Result<Link> {
        Ok(Link { socket: self.socket.try_clone()? })
    }

    /// The raw socket, for a child's descriptor 3.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}
