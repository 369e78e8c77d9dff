//! A real S3 server for one test: Garage (built once per machine by
//! `third_party/build-garage`), one node or a cluster of several on
//! 127.0.0.1 (or an address in a network namespace the benchmark made), each
//! with a throw-away config and data dir in a temporary directory and ports
//! of its own, stopped by PID however the test ends. (Shared by the tests and
//! `benches/s3`.)
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bucket and key every test store has.
pub const BUCKET: &str = "lazyfs-test";
/// Garage key ids are `GK` and 24 hex digits; secrets 64 hex digits.
const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "3a6f1c2b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";

pub struct Garage {
    pub dir: tempfile::TempDir,
    binary: PathBuf,
    pub nodes: Vec<Node>,
    addr: String,
    netns: Option<String>,
}

pub struct Node {
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    child: Option<Child>,
}

/// The path of Garage, built here if needed (the first time takes many minutes).
pub fn build_garage() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("third_party/build-garage");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; the s3:// tests need Garage", script.display()));
    assert!(
        out.status.success(),
        "Garage cannot be built here, so the s3:// source cannot be tested: {} exited with {}:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `addr:port` takes a connection, seen from network namespace `netns`.
fn answers(addr: &str, port: u16, netns: Option<&str>) -> bool {
    let (addr, netns) = (addr.to_string(), netns.map(String::from));
    std::thread::spawn(move || {
        if let Some(ns) = netns {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            // SAFETY: setns on this short-lived thread only.
            let entered = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns {ns}");
        }
        std::net::TcpStream::connect((addr.as_str(), port)).is_ok()
    })
    .join()
    .unwrap()
}

impl Garage {
    /// One node (replication 1) with bucket [`BUCKET`] and the test key.
    pub fn start() -> Garage {
        Self::start_cluster(1)
    }

    /// `count` nodes, each in a zone of its own, replication `count`.
    pub fn start_cluster(count: usize) -> Garage {
        Self::start_at(count, "127.0.0.1", None)
    }

    /// [`start_cluster`](Garage::start_cluster), listening on `addr` inside
    /// network namespace `netns` if given.
    pub fn start_at(count: usize, addr: &str, netns: Option<&str>) -> Garage {
        let dir = tempfile::Builder::new().prefix("lazyfs-garage").tempdir().unwrap();
        let mut garage = Garage {
            dir,
            binary: build_garage(),
            nodes: Vec::new(),
            addr: addr.to_string(),
            netns: netns.map(String::from),
        };
        let secret = blake3::hash(garage.dir.path().as_os_str().as_encoded_bytes()).to_hex().to_string();
        for i in 0..count {
            let node_dir = garage.dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            garage.nodes.push(Node { config: node_dir.join("garage.toml"), s3_port: 0, rpc_port: 0, child: None });
            garage.launch(i, count, &secret);
        }
        let ids: Vec<String> = (0..count).map(|i| garage.node_id(i)).collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            let address = format!("{id}@{}:{}", garage.addr, garage.nodes[i].rpc_port);
            garage.cli_ok(0, &["node", "connect", &address]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            garage.retry_ok(0, &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", short]);
        }
        garage.cli_ok(0, &["layout", "apply", "--version", "1"]);
        garage.retry_ok(0, &["key", "import", "--yes", "-n", "lazyfs-test", KEY_ID, SECRET]);
        garage.retry_ok(0, &["bucket", "create", BUCKET]);
        garage.retry_ok(0, &["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "lazyfs-test"]);
        garage
    }

    /// Writes node `i`'s config and starts it, on other ports until one works.
    fn launch(&mut self, i: usize, count: usize, secret: &str) {
        let node_dir = self.nodes[i].config.parent().unwrap().to_path_buf();
        for _attempt in 0..5 {
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let config = format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {count}\nmetadata_fsync = false\ndata_fsync = false\n\
                 rpc_bind_addr = \"{a}:{rpc_port}\"\nrpc_public_addr = \"{a}:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\nbootstrap_peers = []\n\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{a}:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"{a}:{admin_port}\"\n",
                d = node_dir.display(),
                a = self.addr
            );
            std::fs::write(&self.nodes[i].config, config).unwrap();
            self.nodes[i].s3_port = s3_port;
            self.nodes[i].rpc_port = rpc_port;
            if self.spawn(i) {
                return;
            }
            eprintln!("garage node {i} did not start on port {s3_port}: retrying on others");
        }
        panic!("garage did not start: {}", self.log(i));
    }

    /// Garage, run in the namespace if there is one (and the machine's mount namespace).
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        }
    }

    /// Starts node `i`; true once its S3 port answers.
    fn spawn(&mut self, i: usize) -> bool {
        let mut command = self.command();
        let (addr, netns) = (self.addr.clone(), self.netns.clone());
        let node = &mut self.nodes[i];
        let log = node.config.with_file_name("garage.log");
        let child = command
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
            .spawn()
            .expect("run garage");
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if answers(&addr, node.s3_port, netns.as_deref()) {
                return true;
            }
            if node.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop_node(i);
        false
    }

    /// Node `i`'s full id (`garage node id`).
    fn node_id(&self, i: usize) -> String {
        let out = self.retry_ok(i, &["node", "id", "-q"]);
        out.trim().split('@').next().unwrap().to_string()
    }

    /// `garage -c NODE_CONFIG ARGS`.
    pub fn cli(&self, node: usize, args: &[&str]) -> Output {
        self.command().arg("-c").arg(&self.nodes[node].config).args(args).output().unwrap()
    }

    fn cli_ok(&self, node: usize, args: &[&str]) -> String {
        let out = self.cli(node, args);
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that may fail while the cluster settles, tried for up to 30 s.
    fn retry_ok(&self, node: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(node, args);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(Instant::now() < deadline, "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What node `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].config.with_file_name("garage.log")).unwrap_or_default()
    }

    /// The `AWS_*` variables that reach node `node` as the test key.
    pub fn env_of(&self, node: usize) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", format!("http://{}:{}", self.addr, self.nodes[node].s3_port)),
            ("AWS_ACCESS_KEY_ID", KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
            ("AWS_REGION", "garage".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            // Never ask an instance metadata service (not on loopback).
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn env(&self) -> Vec<(String, String)> {
        self.env_of(0)
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Objects in the bucket, as Garage counts them.
    pub fn objects(&self) -> u64 {
        let info = self.cli_ok(0, &["bucket", "info", BUCKET]);
        info.lines()
            .find_map(|line| line.trim().strip_prefix("Objects:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no object count in `garage bucket info`: {info}"))
    }

    pub fn pid(&self, node: usize) -> i32 {
        self.nodes[node].child.as_ref().expect("the node runs").id() as i32
    }

    /// Stops node `i` (SIGKILL, by its PID).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A node a test stopped with SIGSTOP must be able to die.
            if let Some(child) = &self.nodes[i].child {
                unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            }
            self.stop_node(i);
        }
    }
}
