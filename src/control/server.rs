//! The background process's side of the control socket.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use super::proto::{
    Located, PrefetchStarted, Request, Response, Status, UmountDone, UpgradeAccepted, request, response,
};
use super::{read_message, write_message};
use crate::store::CacheDir;

/// What the control socket asks of the mount's main loop.
pub enum ControlEvent {
    /// Unmount, flush, then answer on this stream.
    Umount(UnixStream),
    /// Hand the mount over to this lazyfs binary, then answer on this stream.
    Upgrade(UnixStream, PathBuf),
}

pub struct Server {
    dir: CacheDir,
    name: &'static str,
}

/// Makes a snapshot of the mount (per file, or only its totals).
pub type StatusHook = Arc<dyn Fn(bool) -> Status + Send + Sync>;
/// Starts background prefetch of the files with these original paths (all
/// when empty): how many were queued, or why not.
pub type PrefetchHook = Arc<dyn Fn(&[Vec<u8>]) -> Result<u64, String> + Send + Sync>;
/// Lists the directories on the way to these paths (original, or below the
/// mountpoint), waiting for the source if it must.
pub type LocateHook = Arc<dyn Fn(&[Vec<u8>]) + Send + Sync>;

impl Server {
    /// Listens on `name` (mode 0600) in `dir`, bound through the directory's
    /// descriptor; `status` makes a snapshot on demand.
    pub fn start(
        dir: &CacheDir,
        name: &'static str,
        status: StatusHook,
        prefetch: PrefetchHook,
        locate: LocateHook,
        events: Sender<ControlEvent>,
    ) -> std::io::Result<Server> {
        let dir = dir.try_clone()?;
        dir.remove(name)?;
        let pinned = dir.pinned(name);
        let listener = UnixListener::bind(&pinned)?;
        std::fs::set_permissions(&pinned, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new().name("lazyfs-control".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let hooks = Hooks { status: status.clone(), prefetch: prefetch.clone(), locate: locate.clone() };
                let events = events.clone();
                let _ = std::thread::Builder::new()
                    .name("lazyfs-control-client".into())
                    .spawn(move || serve_client(stream, hooks, &events));
            }
        })?;
        Ok(Server { dir, name })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(self.name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.dir.remove(self.name);
    }
}

fn reply(stream: &mut UnixStream, kind: response::Kind) -> std::io::Result<()> {
    write_message(stream, &Response { kind: Some(kind) })
}

/// What a client's requests are answered with.
struct Hooks {
    status: StatusHook,
    prefetch: PrefetchHook,
    locate: LocateHook,
}

fn serve_client(mut stream: UnixStream, hooks: Hooks, events: &Sender<ControlEvent>) {
    let Hooks { status, prefetch, locate } = hooks;
    while let Ok(Some(request)) = read_message::<Request>(&mut stream) {
        let sent = match request.kind {
            Some(request::Kind::Status(request)) => {
                reply(&mut stream, response::Kind::Status(status(!request.totals_only)))
            }
            Some(request::Kind::Watch(watch)) => {
                let interval = Duration::from_millis(u64::from(watch.interval_ms.clamp(50, 60_000)));
                loop {
                    if reply(&mut stream, response::Kind::Status(status(true))).is_err() {
                        return;
                    }
                    std::thread::sleep(interval);
                }
            }
            Some(request::Kind::Umount(_)) => {
                let Ok(answer) = stream.try_clone() else {
                    return;
                };
                if events.send(ControlEvent::Umount(answer)).is_err() {
                    let _ = reply(&mut stream, response::Kind::Error("the mount is already stopping".into()));
                }
                return;
            }
            Some(request::Kind::Upgrade(request)) => {
                let Ok(answer) = stream.try_clone() else {
                    return;
                };
                let binary = PathBuf::from(std::ffi::OsString::from_vec(request.binary));
                if events.send(ControlEvent::Upgrade(answer, binary)).is_err() {
                    let _ = reply(&mut stream, response::Kind::Error("the mount is stopping".into()));
                }
                return;
            }
            Some(request::Kind::Prefetch(request)) => match prefetch(&request.paths) {
                Ok(files_queued) => reply(&mut stream, response::Kind::Prefetch(PrefetchStarted { files_queued })),
                Err(message) => reply(&mut stream, response::Kind::Error(message)),
            },
            Some(request::Kind::Locate(request)) => {
                locate(&request.paths);
                reply(&mut stream, response::Kind::Located(Located {}))
            }
            None => reply(&mut stream, response::Kind::Error("unknown request".into())),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Tells a `lazyfs upgrade` client the handover goes ahead, or why not.
pub fn upgrade_answer(stream: &mut UnixStream, refused: Option<String>) {
    let kind = match refused {
        None => response::Kind::Upgrade(UpgradeAccepted {}),
        Some(message) => response::Kind::Error(message),
    };
    let _ = reply(stream, kind);
}

/// Tells a `lazyfs umount` client that the mount is gone.
pub fn umount_done(stream: &mut UnixStream) {
    let _ = reply(stream, response::Kind::Umount(UmountDone {}));
}
