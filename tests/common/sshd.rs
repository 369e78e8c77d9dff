//! A real OpenSSH server for one test: its own port on 127.0.0.1, throw-away
//! host and user keys in a temporary directory, stopped by its PID.
//! (Shared by the tests and `benches/transfer.rs`, which each use a part.)
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn keygen(path: &Path, kind: &str) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "lazyfs-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client) is needed: scripts/setup installs it");
    assert!(status.success());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tempfile::Builder::new().prefix("lazyfs-sshd").tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_ed25519"), "ed25519");
        keygen(&d.join("user_ed25519"), "ed25519");
        std::fs::copy(d.join("user_ed25519.pub"), d.join("authorized_keys")).unwrap();
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut sshd = Sshd { dir, port: 0, child: None };
        sshd.launch();
        let host_key = std::fs::read_to_string(sshd.dir.path().join("host_ed25519.pub")).unwrap();
        let mut fields = host_key.split_whitespace();
        let line = format!("[127.0.0.1]:{} {} {}\n", sshd.port, fields.next().unwrap(), fields.next().unwrap());
        std::fs::write(sshd.known_hosts(), line).unwrap();
        sshd
    }

    fn launch(&mut self) {
        let d = self.dir.path().to_path_buf();
        for _attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n\
                 MaxStartups 200\nMaxSessions 200\nLogLevel ERROR\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), config).unwrap();
            let child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
                .spawn()
                .expect("sshd (openssh-server) is needed: scripts/setup installs it");
            self.child = Some(child);
            self.port = port;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return;
                }
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    eprintln!("sshd on port {port} exited ({status}): retrying on another port");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.stop();
        }
        panic!("sshd did not start: {}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
    }

    pub fn user_key(&self) -> PathBuf {
        self.dir.path().join("user_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    pub fn target(&self) -> String {
        format!("{}@127.0.0.1:{}", whoami(), self.port)
    }

    /// Stops the listener and every session it started: they are its children.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // Session processes are children of the listener: end them first.
            for session in children_of(pid) {
                unsafe { libc::kill(session, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts sshd again on the same port, with the same keys.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let d = self.dir.path().to_path_buf();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not come back on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PIDs whose parent is `pid`, from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The parent PID is the second field after the parenthesised command name.
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent.and_then(|p| p.parse::<i32>().ok()) == Some(pid) {
            children.push(child);
        }
    }
    children
}

pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
