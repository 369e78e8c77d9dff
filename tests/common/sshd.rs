//! A real OpenSSH server for one test: its own port on 127.0.0.1 (or an address
//! in a network namespace the benchmark made), throw-away
//! host and user keys in a temporary directory, stopped by its PID.
//! (Shared by the tests and `benches/transfer.rs`, which each use a part.)
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    addr: String,
    /// Lines added to the generated sshd_config.
    extra: String,
    netns: Option<String>,
    child: Option<Child>,
}

/// Makes a throw-away key pair at `path` and `path.pub`.
pub fn keygen(path: &Path, kind: &str) {
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
        Self::start_at("127.0.0.1", None)
    }

    /// An sshd on 127.0.0.1 with these lines added to its config.
    pub fn start_with(extra: &str) -> Sshd {
        Self::start_full("127.0.0.1", None, extra)
    }

    /// An sshd listening on `addr`, inside network namespace `netns` if given
    /// (the benchmark's WAN profile).
    pub fn start_at(addr: &str, netns: Option<&str>) -> Sshd {
        Self::start_full(addr, netns, "")
    }

    fn start_full(addr: &str, netns: Option<&str>, extra: &str) -> Sshd {
        let dir = tempfile::Builder::new().prefix("lazyfs-sshd").tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_ed25519"), "ed25519");
        keygen(&d.join("user_ed25519"), "ed25519");
        std::fs::copy(d.join("user_ed25519.pub"), d.join("authorized_keys")).unwrap();
        // Lines given first win: sshd keeps the first value of each setting.
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut sshd = Sshd {
            dir,
            port: 0,
            addr: addr.to_string(),
            extra: extra.to_string(),
            netns: netns.map(String::from),
            child: None,
        };
        sshd.launch();
        let host_key = std::fs::read_to_string(sshd.dir.path().join("host_ed25519.pub")).unwrap();
        let mut fields = host_key.split_whitespace();
        let line = format!("[{addr}]:{} {} {}\n", sshd.port, fields.next().unwrap(), fields.next().unwrap());
        std::fs::write(sshd.known_hosts(), line).unwrap();
        sshd
    }

    fn launch(&mut self) {
        let d = self.dir.path().to_path_buf();
        for _attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "{extra}\nPort {port}\nListenAddress {addr}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n\
                 MaxStartups 200\nMaxSessions 200\nLogLevel ERROR\n",
                addr = self.addr,
                d = d.display(),
                extra = self.extra
            );
            std::fs::write(d.join("sshd_config"), config).unwrap();
            self.port = port;
            if self.spawn() {
                return;
            }
            eprintln!("sshd on port {port} did not start: retrying on another port");
        }
        panic!("sshd did not start: {}", std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default());
    }

    /// Starts sshd with the current config; true once it listens (it writes
    /// its pid file then).
    fn spawn(&mut self) -> bool {
        let d = self.dir.path().to_path_buf();
        let pid_file = d.join("sshd.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, "/usr/sbin/sshd"]);
                command
            }
            None => Command::new("/usr/sbin/sshd"),
        };
        let child = command
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd (openssh-server) is needed: scripts/setup installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if pid_file.exists() {
                return true;
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    /// The listener's PID (its sessions are its children).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("sshd runs").id() as i32
    }

    pub fn user_key(&self) -> PathBuf {
        self.dir.path().join("user_ed25519")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// Makes known_hosts know this host by `name` too (`[name]:PORT`).
    pub fn know_as(&self, name: &str) {
        let line = format!("[{name}]:{} {}\n", self.port, self.host_key());
        let known = std::fs::read_to_string(self.known_hosts()).unwrap();
        std::fs::write(self.known_hosts(), known + &line).unwrap();
    }

    /// The host's public key, `TYPE BASE64`.
    pub fn host_key(&self) -> String {
        let line = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub")).unwrap();
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn target(&self) -> String {
        format!("{}@{}:{}", whoami(), self.addr, self.port)
    }

    /// The sessions open now: the listener's children.
    pub fn sessions(&self) -> Vec<i32> {
        self.child.as_ref().map(|c| children_of(c.id() as i32)).unwrap_or_default()
    }

    /// Stops the listener and every session it started: they are its
    /// descendants (a session's monitor forks the process that serves it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // Sessions first, so none outlives the listener as an orphan.
            for session in descendants(pid) {
                // SAFETY: kill(2) on processes this sshd started.
                unsafe { libc::kill(session, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts sshd again on the same port, with the same keys.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "sshd did not come back on port {}", self.port);
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

/// Every process below `pid`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for child in children_of(parent) {
            all.push(child);
            next.push(child);
        }
    }
    all
}

pub fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
