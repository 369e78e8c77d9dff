//! The WAN profile: two network namespaces made for the benchmark, a TUN
//! device in each, and a forwarder of our own between them that holds each
//! packet for half the round-trip time and paces each direction to the link
//! rate (this kernel has no netem). Addresses are from the benchmarking range
//! 198.18.0.0/15 and exist only inside these namespaces.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const CLIENT_ADDR: &str = "198.18.0.1";
pub const SERVER_ADDR: &str = "198.18.0.2";
/// Jumbo frames: fewer packets for the forwarder to move on 2 cores.
const MTU: &str = "9000";

pub struct Wan {
    pub client_ns: String,
    pub server_ns: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip (iproute2)");
    assert!(status.success(), "ip {args:?}");
}

/// Opens TUN device `name` inside network namespace `ns`.
fn open_tun(ns: &str, name: &str) -> File {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || {
        let netns = File::open(format!("/run/netns/{ns}")).expect("netns");
        // SAFETY: setns on this (short-lived) thread only; the descriptor is a netns file.
        assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {ns}");
        let tun = File::options().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        let flags: libc::c_short = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF takes a struct ifreq, which this 40-byte buffer lays out.
        assert_eq!(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) }, 0, "TUNSETIFF");
        tun
    })
    .join()
    .unwrap()
}

/// Moves packets from `from` to `to`, each `delay` late, at most `rate` bytes/s.
fn forward(mut from: File, mut to: File, delay: Duration, rate: f64) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        let mut link_free = Instant::now();
        for (arrived, packet) in rx {
            let due = (arrived + delay).max(link_free);
            let now = Instant::now();
            if due > now + Duration::from_micros(100) {
                std::thread::sleep(due - now);
            }
            link_free = due + Duration::from_secs_f64(packet.len() as f64 / rate);
            if to.write_all(&packet).is_err() {
                return;
            }
        }
    });
}

impl Wan {
    /// Two namespaces `rtt` apart on a link of `rate` bytes per second.
    pub fn start(rtt: Duration, rate: f64) -> Wan {
        let id = std::process::id();
        let wan = Wan { client_ns: format!("lzwan-c{id}"), server_ns: format!("lzwan-s{id}") };
        for ns in [&wan.client_ns, &wan.server_ns] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let client = open_tun(&wan.client_ns, "lzwan0");
        let server = open_tun(&wan.server_ns, "lzwan0");
        for (ns, addr, peer) in [(&wan.client_ns, CLIENT_ADDR, SERVER_ADDR), (&wan.server_ns, SERVER_ADDR, CLIENT_ADDR)]
        {
            ip(&["-n", ns, "addr", "add", addr, "peer", peer, "dev", "lzwan0"]);
            ip(&["-n", ns, "link", "set", "lzwan0", "mtu", MTU, "up"]);
        }
        let half = rtt / 2;
        forward(client.try_clone().unwrap(), server.try_clone().unwrap(), half, rate);
        forward(server, client, half, rate);
        wan
    }

    /// `program` run in the client's namespace (and the machine's mount
    /// namespace, so FUSE mounts stay visible to the benchmark).
    pub fn client(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.client_ns)).arg("--").arg(program);
        command
    }

    /// Runs `f` on a thread inside the client's namespace (sockets it opens live there).
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.client_ns.clone();
        std::thread::spawn(move || {
            let netns = File::open(format!("/run/netns/{ns}")).expect("netns");
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        // Deleting a namespace removes its TUN device; the forwarder threads end.
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
