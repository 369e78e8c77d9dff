//! The SSH source against a real sshd: reads, host keys, authentication.

mod common;

use std::path::Path;

use common::sshd::Sshd;
use lazyfs::source::{self, SourceError, SourceSpec, SshOverrides};

fn open(sshd: &Sshd, overrides: SshOverrides, root: &Path) -> Result<Box<dyn source::Connection>, SourceError> {
    let home = sshd.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let spec = SourceSpec::parse(&sshd.target(), &overrides, Some(&home))?;
    source::open(&spec, root)?.connect()
}

fn overrides(sshd: &Sshd) -> SshOverrides {
    SshOverrides { identities: vec![sshd.user_key()], known_hosts: Some(sshd.known_hosts()), ..Default::default() }
}

#[test]
fn reads_ranges_over_sftp() {
    let sshd = Sshd::start();
    let data = sshd.dir.path().join("data");
    std::fs::create_dir_all(data.join("dir with space")).unwrap();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(data.join("dir with space/$(x);`y`"), &bytes).unwrap();

    let mut conn = open(&sshd, overrides(&sshd), &data).unwrap();
    let path = Path::new("/dir with space/$(x);`y`");
    assert_eq!(conn.stat(path).unwrap().size, 3_000_000);
    for (offset, len) in [(0usize, 10usize), (1_000_000, 1 << 20), (2_999_990, 10), (5, 100_000)] {
        let mut buf = vec![0; len];
        conn.read_exact_at(path, 0, offset as u64, &mut buf).unwrap();
        assert!(buf == bytes[offset..offset + len], "range {offset}+{len}");
    }
    let mut buf = vec![0; 20];
    let err = conn.read_exact_at(path, 0, 2_999_990, &mut buf).unwrap_err();
    assert!(matches!(err, SourceError::Short { end: 3_000_000, .. }), "{err}");
    let err = conn.stat(Path::new("/missing")).unwrap_err();
    assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
}

#[test]
fn unknown_host_key_is_refused_unless_accepted() {
    let sshd = Sshd::start();
    let empty = sshd.dir.path().join("empty_known_hosts");
    let mut o = overrides(&sshd);
    o.known_hosts = Some(empty.clone());
    let err = open(&sshd, o.clone(), Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::UnknownHostKey { .. }), "{err}");
    assert!(err.to_string().contains("--accept-new-host-key"), "{err}");

    o.accept_new_host_key = true;
    open(&sshd, o.clone(), Path::new("/")).unwrap();
    o.accept_new_host_key = false;
    open(&sshd, o, Path::new("/")).expect("the accepted key is now known");
    assert!(std::fs::read_to_string(&empty).unwrap().contains(&format!("[127.0.0.1]:{}", sshd.port)));
}

#[test]
fn changed_host_key_is_always_refused() {
    let sshd = Sshd::start();
    let other = sshd.dir.path().join("other");
    common::sshd::keygen(&other, "ed25519");
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut fields = pubkey.split_whitespace();
    let kh = sshd.dir.path().join("changed_known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {} {}\n", sshd.port, fields.next().unwrap(), fields.next().unwrap()))
        .unwrap();
    let mut o = overrides(&sshd);
    o.known_hosts = Some(kh);
    o.accept_new_host_key = true;
    let err = open(&sshd, o, Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::ChangedHostKey { .. }), "{err}");
}

#[test]
fn wrong_key_fails_authentication_with_what_was_tried() {
    let sshd = Sshd::start();
    let stranger = sshd.dir.path().join("stranger");
    common::sshd::keygen(&stranger, "ed25519");
    let mut o = overrides(&sshd);
    o.identities = vec![stranger.clone()];
    let err = open(&sshd, o, Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::Auth { .. }), "{err}");
    assert!(err.to_string().contains(&stranger.display().to_string()), "{err}");
}
