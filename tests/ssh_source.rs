//! The SSH source against a real sshd, through both transports (the system's
//! `ssh` and libssh2): reads, host keys, authentication, the user's ssh
//! config, and small files through `tar` or, where the account may not run
//! commands, SFTP.

mod common;

use std::path::{Path, PathBuf};

use common::sshd::{Sshd, keygen, whoami};
use lazyfs::source::{self, SourceError, SourceSpec, SshOverrides, Transport, WholeRead};

/// Runs each test once per transport: `openssh::NAME` and `libssh2::NAME`.
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod openssh {
            $(#[test] fn $name() { super::$name(lazyfs::source::Transport::Openssh) })*
        }
        mod libssh2 {
            $(#[test] fn $name() { super::$name(lazyfs::source::Transport::Libssh2) })*
        }
    };
}

both_transports!(
    reads_ranges_over_sftp,
    unknown_host_key_is_refused_unless_accepted,
    changed_host_key_is_refused_naming_the_file_that_holds_it,
    wrong_key_fails_authentication_with_what_was_tried,
    host_key_alias_is_honoured_and_never_duplicated,
    small_files_through_tar_or_sftp_where_commands_are_refused,
);

/// A HOME of the test's own, with `.ssh/`.
fn home(sshd: &Sshd) -> PathBuf {
    let home = sshd.dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    home
}

fn connect(
    target: &str,
    home: &Path,
    overrides: SshOverrides,
    root: &Path,
) -> Result<Box<dyn source::Connection>, SourceError> {
    let spec = SourceSpec::parse(target, &overrides, Some(home))?;
    source::open(&spec, root)?.connect()
}

fn open(sshd: &Sshd, overrides: SshOverrides, root: &Path) -> Result<Box<dyn source::Connection>, SourceError> {
    connect(&sshd.target(), &home(sshd), overrides, root)
}

fn overrides(sshd: &Sshd, transport: Transport) -> SshOverrides {
    SshOverrides {
        identities: vec![sshd.user_key()],
        known_hosts: Some(sshd.known_hosts()),
        transport,
        ..Default::default()
    }
}

fn reads_ranges_over_sftp(transport: Transport) {
    let sshd = Sshd::start();
    let data = sshd.dir.path().join("data");
    std::fs::create_dir_all(data.join("dir with space")).unwrap();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(data.join("dir with space/$(x);`y`"), &bytes).unwrap();

    let mut conn = open(&sshd, overrides(&sshd, transport), &data).unwrap();
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

fn unknown_host_key_is_refused_unless_accepted(transport: Transport) {
    let sshd = Sshd::start();
    let empty = sshd.dir.path().join("empty_known_hosts");
    let mut o = overrides(&sshd, transport);
    o.known_hosts = Some(empty.clone());
    let err = open(&sshd, o.clone(), Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::UnknownHostKey { .. }), "{err}");
    assert!(err.to_string().contains("--accept-new-host-key"), "{err}");
    assert!(err.to_string().contains("SHA256:"), "{err}");

    o.accept_new_host_key = true;
    open(&sshd, o.clone(), Path::new("/")).unwrap();
    o.accept_new_host_key = false;
    open(&sshd, o, Path::new("/")).expect("the accepted key is now known");
    let recorded = std::fs::read_to_string(&empty).unwrap();
    assert!(recorded.contains(&format!("[127.0.0.1]:{}", sshd.port)) || recorded.starts_with("|1|"), "{recorded}");
    assert_eq!(recorded.lines().count(), 1, "{recorded}");
}

/// A key for `name` that is not the host's, in a known_hosts file.
fn wrong_key_entry(sshd: &Sshd, name: &str) -> String {
    let other = sshd.dir.path().join("other");
    if !other.exists() {
        keygen(&other, "ed25519");
    }
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let key: Vec<&str> = pubkey.split_whitespace().take(2).collect();
    format!("{name} {}\n", key.join(" "))
}

fn changed_host_key_is_refused_naming_the_file_that_holds_it(transport: Transport) {
    let sshd = Sshd::start();
    let kh = sshd.dir.path().join("changed_known_hosts");
    std::fs::write(&kh, wrong_key_entry(&sshd, &format!("[127.0.0.1]:{}", sshd.port))).unwrap();
    let mut o = overrides(&sshd, transport);
    o.known_hosts = Some(kh.clone());
    o.accept_new_host_key = true;
    let err = open(&sshd, o, Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::ChangedHostKey { .. }), "{err}");
    let advice = format!("ssh-keygen -f '{}' -R '[127.0.0.1]:{}'", kh.display(), sshd.port);
    assert!(err.to_string().contains(&advice), "{err}");
    assert!(err.to_string().contains("SHA256:"), "{err}");
}

fn wrong_key_fails_authentication_with_what_was_tried(transport: Transport) {
    let sshd = Sshd::start();
    let stranger = sshd.dir.path().join("stranger");
    keygen(&stranger, "ed25519");
    let mut o = overrides(&sshd, transport);
    o.identities = vec![stranger.clone()];
    let err = open(&sshd, o, Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::Auth { .. }), "{err}");
    assert!(err.to_string().contains(&stranger.display().to_string()), "{err}");
    // The user and the host, each said once.
    let said = format!("authentication as {} on [127.0.0.1]:{} failed", whoami(), sshd.port);
    assert!(err.to_string().contains(&said), "{err}");
}

/// `HostKeyAlias` in ~/.ssh/config: the host is known (hashed) under the
/// alias only; the connection succeeds, and --accept-new-host-key adds nothing.
fn host_key_alias_is_honoured_and_never_duplicated(transport: Transport) {
    let sshd = Sshd::start();
    let home = home(&sshd);
    let kh = home.join(".ssh/known_hosts");
    std::fs::write(&kh, format!("old-db {}\n", sshd.host_key())).unwrap();
    let hashed = std::process::Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh).output().unwrap();
    assert!(hashed.status.success());
    let before = std::fs::read_to_string(&kh).unwrap();
    assert!(before.starts_with("|1|"), "{before}");
    std::fs::write(
        home.join(".ssh/config"),
        format!(
            "Host old\n  HostName 127.0.0.1\n  Port {}\n  HostKeyAlias old-db\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
            sshd.port,
            sshd.user_key().display(),
            kh.display()
        ),
    )
    .unwrap();
    let o = SshOverrides { transport, accept_new_host_key: true, ..Default::default() };
    let mut conn = connect(&format!("{}@old", common::sshd::whoami()), &home, o, Path::new("/")).unwrap();
    assert!(conn.stat(&kh).is_ok());
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), before, "known_hosts must not change");

    // The alias, not the address, is what a changed key is checked under.
    std::fs::write(&kh, wrong_key_entry(&sshd, "old-db")).unwrap();
    let o = SshOverrides { transport, ..Default::default() };
    let err = connect(&format!("{}@old", common::sshd::whoami()), &home, o, Path::new("/")).err().expect("refused");
    assert!(matches!(err, SourceError::ChangedHostKey { .. }), "{err}");
    assert!(err.to_string().contains(&format!("ssh-keygen -f '{}' -R 'old-db'", kh.display())), "{err}");
}

/// Reads files through `read_files` and checks each result.
fn read_batch(conn: &mut dyn source::Connection, root: &Path) {
    let files: Vec<(String, usize)> = (0..80).map(|i| (format!("/d/f {i};$(x)"), 1 + i * 1500)).collect();
    for (path, len) in &files {
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join(&path[1..]), common::mount::content(path, *len)).unwrap();
    }
    // Expected sizes: right, one byte more than the file, one byte less, missing.
    let mut wanted: Vec<(PathBuf, usize)> = files.iter().map(|(p, l)| (PathBuf::from(p), *l)).collect();
    wanted[3].1 += 1;
    wanted[4].1 -= 1;
    wanted.push(("/d/missing".into(), 5));
    let mut bufs: Vec<Vec<u8>> = wanted.iter().map(|(_, l)| vec![0; *l]).collect();
    let mut reads: Vec<WholeRead<'_>> = wanted
        .iter()
        .zip(bufs.iter_mut())
        .map(|((path, _), buf)| WholeRead { path, buf, listed: None, result: Ok(()) })
        .collect();
    conn.read_files(&mut reads).unwrap();
    let results: Vec<Result<(), SourceError>> = reads.into_iter().map(|r| r.result).collect();
    for (i, ((path, len), result)) in wanted.iter().zip(&results).enumerate() {
        match i {
            3 => assert!(matches!(result, Err(SourceError::Short { .. })), "{path:?}: {result:?}"),
            4 => assert!(matches!(result, Err(SourceError::Longer { .. })), "{path:?}: {result:?}"),
            80 => assert!(matches!(result, Err(SourceError::NotFound { .. })), "{path:?}: {result:?}"),
            _ => {
                assert!(result.is_ok(), "{path:?}: {result:?}");
                assert!(bufs[i] == common::mount::content(&path.to_string_lossy(), *len), "{path:?}");
            }
        }
    }
}

/// Sessions that ran a command (sshd logs each at VERBOSE).
fn command_sessions(sshd: &Sshd) -> usize {
    sshd.log().matches("Starting session: command").count()
        + sshd.log().matches("Starting session: forced-command (config) 'internal-sftp' for").count()
}

fn small_files_through_tar_or_sftp_where_commands_are_refused(transport: Transport) {
    // An account that may run commands: one tar stream per batch.
    let sshd = Sshd::start_with("LogLevel VERBOSE");
    let root = sshd.dir.path().join("data");
    let tar = SshOverrides { tar: true, ..overrides(&sshd, transport) };
    let mut conn = open(&sshd, tar.clone(), &root).unwrap();
    read_batch(conn.as_mut(), &root);
    let log = sshd.log();
    assert_eq!(log.matches("Starting session: command").count(), 1, "one tar: {log}");
    // The tar session rides the SFTP session's connection (a multiplexed
    // session of its `ssh`, or a channel of the libssh2 session): one login.
    assert_eq!(log.matches("Accepted publickey").count(), 1, "one login: {log}");

    // `ForceCommand internal-sftp`: tar is tried once, then SFTP does all.
    let sshd = Sshd::start_with("LogLevel VERBOSE\nForceCommand internal-sftp");
    let tar = SshOverrides { tar: true, ..overrides(&sshd, transport) };
    let mut conn = open(&sshd, tar, &root).unwrap();
    read_batch(conn.as_mut(), &root);
    let tried = command_sessions(&sshd);
    read_batch(conn.as_mut(), &root);
    assert_eq!(command_sessions(&sshd), tried, "tar is not asked again: {}", sshd.log());
    assert!(tried >= 2, "the SFTP session and one try of tar: {}", sshd.log());

    // Without --tar, SFTP only.
    let sshd = Sshd::start_with("LogLevel VERBOSE");
    let mut conn = open(&sshd, overrides(&sshd, transport), &root).unwrap();
    read_batch(conn.as_mut(), &root);
    assert_eq!(sshd.log().matches("Starting session: command").count(), 0, "{}", sshd.log());
}
