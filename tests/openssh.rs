//! A host as datacenter users reach it, configured only in ~/.ssh/config:
//! through a ProxyJump bastion (a second sshd), known under a HostKeyAlias,
//! logging in with a user certificate its CA signed. `lazyfs mount` with no
//! SSH flag at all reaches it; libssh2 cannot, and says what to do.

mod common;

use std::process::Command;

use common::mount::{TestEnv, content, dataset, is_mounted};
use common::sshd::{Sshd, keygen, whoami};

#[test]
fn proxyjump_bastion_host_key_alias_and_certificate_from_the_ssh_config_alone() {
    let env = TestEnv::new();
    let ssh_dir = env.path("home/.ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    // The CA and the user's key, which only its certificate lets in.
    let ca = ssh_dir.join("ca");
    keygen(&ca, "ed25519");
    let key = ssh_dir.join("id_work");
    keygen(&key, "ed25519");
    let signed = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca)
        .args(["-I", "lazyfs-test", "-n", &whoami(), "-V", "-5m:+1h"])
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    let cert = ssh_dir.join("id_work-cert.pub");
    assert!(cert.exists());

    let bastion = Sshd::start_with("LogLevel DEBUG1");
    let target =
        Sshd::start_with(&format!("TrustedUserCAKeys {}\nAuthorizedKeysFile none", ca.with_extension("pub").display()));
    let kh = ssh_dir.join("known_hosts");
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\nlazyfs-target {}\n", bastion.port, bastion.host_key(), target.host_key()),
    )
    .unwrap();
    std::fs::write(
        ssh_dir.join("config"),
        format!(
            "Host old-db\n  HostName 127.0.0.1\n  Port {tport}\n  User {user}\n  ProxyJump bastion\n  \
             HostKeyAlias lazyfs-target\n  IdentityFile {key}\n  CertificateFile {cert}\n  UserKnownHostsFile {kh}\n\
             Host bastion\n  HostName 127.0.0.1\n  Port {bport}\n  User {user}\n  IdentityFile {bkey}\n  \
             UserKnownHostsFile {kh}\n",
            tport = target.port,
            bport = bastion.port,
            user = whoami(),
            key = key.display(),
            cert = cert.display(),
            kh = kh.display(),
            bkey = bastion.user_key().display(),
        ),
    )
    .unwrap();
    let known_before = std::fs::read_to_string(&kh).unwrap();

    // The bytes live on the target, below a root of their own.
    let root = target.dir.path().join("data");
    dataset(&root, &env.path("images"), &[("/srv/db/table", 100_000), ("/srv/db/log", 10)]);
    let mount = |name: &str, extra: &[&str]| {
        let mountpoint = env.path("mnt").join(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        let out = env
            .lazyfs()
            .arg("mount")
            .arg(&mountpoint)
            .arg(env.path("images"))
            .arg("old-db")
            .arg("--source-root")
            .arg(&root)
            .arg("--cache-dir")
            .arg(env.path("cache").join(name))
            .args(extra)
            .output()
            .unwrap();
        (mountpoint, out)
    };

    let (mountpoint, out) = mount("m", &["--prefetch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let guard = common::mount::Mount {
        mountpoint: mountpoint.clone(),
        cache: env.path("cache/m"),
        env_home: env.tmp.path().into(),
    };
    assert_eq!(std::fs::read(guard.at("/srv/db/table")).unwrap(), content("/srv/db/table", 100_000));
    assert_eq!(std::fs::read(guard.at("/srv/db/log")).unwrap(), content("/srv/db/log", 10));
    // It went through the bastion, which forwarded to the target's port.
    assert!(
        bastion.log().contains(&format!("port {}", target.port)) && bastion.log().contains("direct-tcpip"),
        "{}",
        bastion.log()
    );
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), known_before, "known_hosts unchanged");
    drop(guard);
    assert!(!is_mounted(&mountpoint));

    // libssh2 cannot follow ProxyJump: it says so, and what to give instead.
    let (mountpoint, out) = mount("l", &["--ssh", "libssh2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("ProxyJump") && stderr.contains("--ssh openssh"), "{stderr}");
    assert!(!is_mounted(&mountpoint));
}
