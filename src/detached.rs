//! Whether a mount is still attached where it was made, and which processes
//! hold files of it. A mount detached (`umount -l`, or lazyfs's own detach of
//! a busy mount on SIGTERM) lives on, unreachable by its path, until its last
//! open file is closed; `lazyfs status` says so, with those processes' PIDs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A live mount, known by its device number.
pub struct Attachment {
    dev: u64,
    /// Its mount ID (what `/proc/PID/fdinfo` says of each open file).
    mount_id: u64,
    detached: AtomicBool,
}

impl Attachment {
    /// The mount now at `mountpoint` (just mounted, answering), found in the
    /// mount table: a stat through the mount would make the kernel cache the
    /// root's attributes, and a stale mount then look alive.
    pub fn of(mountpoint: &Path) -> std::io::Result<Attachment> {
        use std::os::unix::ffi::OsStrExt;
        // As the table writes it: symlink-free (the parent resolved, not the
        // mount itself), some bytes escaped in octal.
        let path = match (mountpoint.parent(), mountpoint.file_name()) {
            (Some(parent), Some(name)) => std::fs::canonicalize(parent).map(|p| p.join(name)),
            _ => Ok(mountpoint.to_path_buf()),
        }?;
        let mut wanted = Vec::new();
        for &byte in path.as_os_str().as_bytes() {
            match byte {
                b' ' | b'\t' | b'\n' | b'\\' => wanted.extend(format!("\\{byte:03o}").bytes()),
                other => wanted.push(other),
            }
        }
        let info = std::fs::read("/proc/self/mountinfo")?;
        // The last line for the path is the mount on top.
        let (mount_id, dev) = info
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let fields: Vec<&str> = std::str::from_utf8(line).ok()?.split(' ').collect();
                (fields.get(4).map(|f| f.as_bytes()) == Some(wanted.as_slice()))
                    .then(|| Some((fields[0], fields[2])))?
            })
            .next_back()
            .and_then(|(id, dev)| {
                let (major, minor) = dev.split_once(':')?;
                Some((id.parse().ok()?, libc::makedev(major.parse().ok()?, minor.parse().ok()?)))
            })
            .ok_or_else(|| std::io::Error::other("not in the mount table"))?;
        Ok(Attachment { dev, mount_id, detached: AtomicBool::new(false) })
    }

    /// The mount another process made (`of` told it these numbers), attached or not.
    pub fn known(dev: u64, mount_id: u64) -> Attachment {
        Attachment { dev, mount_id, detached: AtomicBool::new(false) }
    }

    /// Its device number and mount ID, for [`Attachment::known`].
    pub fn numbers(&self) -> (u64, u64) {
        (self.dev, self.mount_id)
    }

    /// lazyfs detached it itself.
    pub fn set_detached(&self) {
        self.detached.store(true, Ordering::Relaxed);
    }

    /// Whether it is no longer in the mount table (once detached, for good).
    pub fn is_detached(&self) -> bool {
        if self.detached.load(Ordering::Relaxed) {
            return true;
        }
        let wanted = format!("{}:{}", libc::major(self.dev), libc::minor(self.dev));
        let attached = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|info| info.lines().any(|line| line.split(' ').nth(2) == Some(wanted.as_str())))
            .unwrap_or(true);
        if !attached {
            self.detached.store(true, Ordering::Relaxed);
        }
        !attached
    }

    /// PIDs of the processes with a file of this mount open, mapped, or as
    /// their working or root directory (this process aside).
    pub fn holders(&self) -> Vec<u32> {
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me && self.held_by(pid))
            .collect();
        pids.sort_unstable();
        pids
    }

    fn held_by(&self, pid: u32) -> bool {
        let on_mount = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.dev() == self.dev);
        let proc = Path::new("/proc").join(pid.to_string());
        if on_mount(&proc.join("cwd")) || on_mount(&proc.join("root")) {
            return true;
        }
        // Open files by their mount ID: no stat that could hang on another mount.
        let wanted_id = format!("mnt_id:\t{}", self.mount_id);
        let fds = std::fs::read_dir(proc.join("fdinfo")).into_iter().flatten().flatten();
        if fds.into_iter().any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|i| i.lines().any(|l| l == wanted_id)))
        {
            return true;
        }
        // Mapped files: the fourth field is the device, "major:minor" in hex.
        let wanted = format!("{:02x}:{:02x}", libc::major(self.dev), libc::minor(self.dev));
        std::fs::read_to_string(proc.join("maps"))
            .is_ok_and(|maps| maps.lines().any(|line| line.split_whitespace().nth(3) == Some(wanted.as_str())))
    }
}

/// What `lazyfs umount` of a detached mount is told.
pub fn umount_answer(mountpoint: &Path, holders: &[u32]) -> String {
    let by = match holders {
        [] => String::new(),
        pids => format!(" (by PIDs {})", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
    };
    format!(
        "{} is already unmounted (detached); lazyfs (pid {}) ends once the files still open under it are closed{by}",
        mountpoint.display(),
        std::process::id()
    )
}
