//! The SOURCE argument, and the SSH settings that `~/.ssh/config` and the
//! command line give it.

use std::path::{Path, PathBuf};

use ssh2_config::{ParseRule, SshConfig};

use super::SourceError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A directory holding the old host's root.
    Local(PathBuf),
    Ssh(Box<SshOptions>),
    /// What `lazyfs push` put in an object store.
    S3(crate::s3::S3Url),
}

/// Everything needed to open an SSH session, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    /// The name given on the command line (maybe a `~/.ssh/config` alias).
    pub alias: String,
    /// The host to connect to (`HostName`, or the alias).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Tried in order after the ssh-agent.
    pub identities: Vec<PathBuf>,
    pub known_hosts: PathBuf,
    /// The name known_hosts lists the host under (`HostKeyAlias`), if not the host's own.
    pub host_key_alias: Option<String>,
    pub accept_new_host_key: bool,
    pub transport: Transport,
    /// Batches of small files through one `tar` on the host (`--tar`).
    pub tar: bool,
    /// A setting of the ssh config that only OpenSSH's `ssh` follows (`ProxyJump`, ...).
    pub needs_openssh: Option<String>,
    /// What the command line itself said: the system `ssh` resolves the rest from
    /// the config as it always does.
    pub given: Given,
}

/// The parts of the SSH settings the command line gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Given {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identities: Vec<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    /// `-F FILE`.
    pub config_file: Option<PathBuf>,
    /// `$HOME/.ssh`, where lazyfs looks for the config, keys and known_hosts.
    pub ssh_dir: Option<PathBuf>,
}

/// Which SSH implementation carries the session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// The system `ssh` client (`ssh -s HOST sftp`): the user's ssh config as it is.
    Openssh,
    /// libssh2, in process.
    Libssh2,
    /// Both where `ssh` is installed and the ssh config needs nothing only
    /// `ssh` follows: libssh2 for what readers wait on (it connects faster),
    /// `ssh` for bulk transfers (it streams at less cost); else OpenSSH when
    /// `ssh` is installed, otherwise libssh2.
    #[default]
    Auto,
}

/// The SSH settings of `lazyfs mount`'s command line.
#[derive(Debug, Clone, Default)]
pub struct SshOverrides {
    pub identities: Vec<PathBuf>,
    pub port: Option<u16>,
    pub known_hosts: Option<PathBuf>,
    pub accept_new_host_key: bool,
    /// `-F FILE`: this ssh config instead of `~/.ssh/config`.
    pub config_file: Option<PathBuf>,
    pub transport: Transport,
    pub tar: bool,
}

/// Settings of an ssh config that libssh2 cannot follow.
const OPENSSH_ONLY: [&str; 6] =
    ["ProxyCommand", "PKCS11Provider", "ControlPath", "SecurityKeyProvider", "Match", "KnownHostsCommand"];

impl SourceSpec {
    /// `s3://BUCKET/PREFIX` is an object store; `file:///DIR` or any path
    /// with a `/` a local directory; otherwise `[ssh://][USER@]HOST[:PORT]`,
    /// completed from `HOME/.ssh/config`.
    pub fn parse(arg: &str, overrides: &SshOverrides, home: Option<&Path>) -> Result<Self, SourceError> {
        if arg.starts_with("s3://") {
            return crate::s3::S3Url::parse(arg).map(SourceSpec::S3).map_err(|e| SourceError::Config(e.to_string()));
        }
        if let Some(dir) = arg.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(SourceError::Config(format!(
                    "{arg}: a file:// source needs an absolute path, as file:///DIR"
                )));
            }
            return Ok(SourceSpec::Local(PathBuf::from(dir)));
        }
        let (explicit_ssh, rest) = match arg.strip_prefix("ssh://") {
            Some(rest) => (true, rest.trim_end_matches('/')),
            None => (false, arg),
        };
        if !explicit_ssh && arg.contains('/') {
            return Ok(SourceSpec::Local(PathBuf::from(arg)));
        }
        let (user, host, port) = split_target(rest).ok_or_else(|| {
            SourceError::Config(format!("{arg}: not a source: expected [USER@]HOST[:PORT], ssh://..., or a directory"))
        })?;
        Ok(SourceSpec::Ssh(Box::new(resolve(&host, user, port, overrides, home)?)))
    }
}

impl SourceSpec {
    /// What the command line names on this host is there: a local SOURCE
    /// directory, each `-i` file. Checked before anything is made or the
    /// source is asked anything, so a typo is said as such.
    pub fn check_local(&self) -> Result<(), SourceError> {
        match self {
            SourceSpec::Local(dir) if !dir.is_dir() => Err(SourceError::Config(format!(
                "SOURCE {}: {}: a local SOURCE is the directory that holds the old host's files",
                dir.display(),
                if dir.exists() { "not a directory" } else { "no such directory" }
            ))),
            SourceSpec::Ssh(options) => match options.given.identities.iter().find(|i| !i.is_file()) {
                Some(missing) => Err(SourceError::Config(format!(
                    "-i {}: {}: give the private key to log in with",
                    missing.display(),
                    if missing.exists() { "not a file" } else { "no such file" }
                ))),
                None => Ok(()),
            },
            SourceSpec::Local(_) | SourceSpec::S3(_) => Ok(()),
        }
    }
}

/// `user@host:port`, `host`, `[::1]:22`.
fn split_target(target: &str) -> Option<(Option<String>, String, Option<u16>)> {
    let (user, hostport) = match target.rsplit_once('@') {
        Some((user, rest)) if !user.is_empty() => (Some(user.to_string()), rest),
        Some(_) => return None,
        None => (None, target),
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((user, host.to_string(), port))
}

fn resolve(
    alias: &str,
    user: Option<String>,
    port: Option<u16>,
    overrides: &SshOverrides,
    home: Option<&Path>,
) -> Result<SshOptions, SourceError> {
    let ssh_dir = home.map(|h| h.join(".ssh"));
    let config_file = match &overrides.config_file {
        Some(file) if !file.exists() => {
            return Err(SourceError::Config(format!("-F {}: no such ssh config file", file.display())));
        }
        Some(file) => Some(file.clone()),
        None => ssh_dir.as_ref().map(|d| d.join("config")).filter(|c| c.exists()),
    };
    let params = match config_file {
        Some(file) => {
            let text = std::fs::read(&file).map_err(|e| SourceError::Io { path: file.clone(), source: e })?;
            let mut config = SshConfig::default();
            if let Some(home) = home {
                config = config.home_dir(home);
            }
            let config = config
                .parse(&mut text.as_slice(), ParseRule::ALLOW_UNKNOWN_FIELDS | ParseRule::ALLOW_UNSUPPORTED_FIELDS)
                .map_err(|e| SourceError::Config(format!("{}: {e}", file.display())))?;
            Some(config.query(alias))
        }
        None => None,
    };
    let from_config = |f: &dyn Fn(&ssh2_config::HostParams) -> Option<String>| params.as_ref().and_then(f);
    let unsupported = |key: &str| {
        from_config(&|p| p.unsupported_fields.get(key).or_else(|| p.ignored_fields.get(key))?.first().cloned())
    };

    let mut identities = overrides.identities.clone();
    if let Some(files) = params.as_ref().and_then(|p| p.identity_file.clone()) {
        identities.extend(files.into_iter().map(|f| expand_tilde(&f, home)));
    }
    if let Some(dir) = &ssh_dir {
        identities.extend(["id_ed25519", "id_ecdsa", "id_rsa"].map(|name| dir.join(name)));
    }
    identities.dedup();

    let known_hosts = overrides
        .known_hosts
        .clone()
        .or_else(|| unsupported("userknownhostsfile").map(|f| expand_tilde(Path::new(&f), home)))
        .or_else(|| ssh_dir.as_ref().map(|d| d.join("known_hosts")))
        .ok_or_else(|| SourceError::Config("no home directory for ~/.ssh/known_hosts: give --known-hosts".into()))?;

    Ok(SshOptions {
        alias: alias.to_string(),
        host: from_config(&|p| p.host_name.clone()).unwrap_or_else(|| alias.to_string()),
        port: overrides.port.or(port).or_else(|| params.as_ref().and_then(|p| p.port)).unwrap_or(22),
        user: user.clone().or_else(|| from_config(&|p| p.user.clone())).unwrap_or_else(current_user),
        identities,
        known_hosts,
        host_key_alias: unsupported("hostkeyalias"),
        accept_new_host_key: overrides.accept_new_host_key,
        transport: overrides.transport,
        tar: overrides.tar,
        needs_openssh: needs_openssh(params.as_ref()),
        given: Given {
            user,
            port: overrides.port.or(port),
            identities: overrides.identities.clone(),
            known_hosts: overrides.known_hosts.clone(),
            config_file: overrides.config_file.clone(),
            ssh_dir: ssh_dir.clone(),
        },
    })
}

/// The first setting of the host's config that only OpenSSH follows.
fn needs_openssh(params: Option<&ssh2_config::HostParams>) -> Option<String> {
    let params = params?;
    if params.proxy_jump.is_some() {
        return Some("ProxyJump".into());
    }
    if params.certificate_file.is_some() {
        return Some("CertificateFile".into());
    }
    OPENSSH_ONLY
        .iter()
        .find(|key| {
            let key = key.to_lowercase();
            params.unsupported_fields.contains_key(&key) || params.ignored_fields.contains_key(&key)
        })
        .map(|key| key.to_string())
}

fn expand_tilde(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(arg: &str, home: Option<&Path>) -> SshOptions {
        match SourceSpec::parse(arg, &SshOverrides::default(), home).unwrap() {
            SourceSpec::Ssh(o) => *o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn local_forms() {
        let parse = |a: &str| SourceSpec::parse(a, &SshOverrides::default(), None).unwrap();
        assert_eq!(parse("file:///srv/snap"), SourceSpec::Local("/srv/snap".into()));
        assert_eq!(parse("./old-root"), SourceSpec::Local("./old-root".into()));
        assert_eq!(parse("/mnt/old"), SourceSpec::Local("/mnt/old".into()));
        assert!(SourceSpec::parse("file://relative", &SshOverrides::default(), None).is_err());
        let SourceSpec::S3(url) = parse("s3://ckpts/app/one") else { panic!("not s3") };
        assert_eq!((url.bucket.as_str(), url.prefix.as_str()), ("ckpts", "app/one"));
        assert!(SourceSpec::parse("s3://", &SshOverrides::default(), None).is_err());
    }

    #[test]
    fn ssh_forms() {
        let home = tempfile::tempdir().unwrap();
        let ssh = |arg| ssh(arg, Some(home.path()));
        let o = ssh("alice@old-host:2222");
        assert_eq!((o.user.as_str(), o.host.as_str(), o.port), ("alice", "old-host", 2222));
        let o = ssh("ssh://bob@10.1.2.3");
        assert_eq!((o.user.as_str(), o.host.as_str(), o.port), ("bob", "10.1.2.3", 22));
        let o = ssh("[::1]:2200");
        assert_eq!(o.known_hosts, home.path().join(".ssh/known_hosts"));
        assert_eq!((o.host.as_str(), o.port), ("::1", 2200));
        for bad in ["@host", "host:notaport", "", "ssh://"] {
            assert!(SourceSpec::parse(bad, &SshOverrides::default(), Some(home.path())).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_config_fills_in_and_flags_override() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".ssh")).unwrap();
        std::fs::write(
            home.path().join(".ssh/config"),
            "Host old\n  HostName 127.0.0.1\n  User carol\n  Port 2022\n  IdentityFile ~/.ssh/old_key\n  UserKnownHostsFile ~/.ssh/old_known\n",
        )
        .unwrap();
        let o = ssh("old", Some(home.path()));
        assert_eq!((o.alias.as_str(), o.host.as_str(), o.user.as_str(), o.port), ("old", "127.0.0.1", "carol", 2022));
        assert_eq!(o.identities[0], home.path().join(".ssh/old_key"));
        assert_eq!(o.identities[1], home.path().join(".ssh/id_ed25519"));
        assert_eq!(o.known_hosts, home.path().join(".ssh/old_known"));

        let overrides = SshOverrides {
            identities: vec!["/k".into()],
            port: Some(3000),
            known_hosts: Some("/kh".into()),
            accept_new_host_key: true,
            ..Default::default()
        };
        let SourceSpec::Ssh(o) = SourceSpec::parse("dave@old:2023", &overrides, Some(home.path())).unwrap() else {
            panic!()
        };
        assert_eq!((o.user.as_str(), o.port), ("dave", 3000));
        assert_eq!(o.identities[0], PathBuf::from("/k"));
        assert_eq!(o.known_hosts, PathBuf::from("/kh"));
    }

    #[test]
    fn dash_f_replaces_the_ssh_config_and_what_only_openssh_follows_is_named() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".ssh")).unwrap();
        std::fs::write(home.path().join(".ssh/config"), "Host old\n  HostName 10.0.0.1\n").unwrap();
        let other = home.path().join("other_config");
        std::fs::write(&other, "Host old\n  HostName 10.0.0.2\n  HostKeyAlias old-db\n  ProxyJump gw\n").unwrap();
        let o = ssh("old", Some(home.path()));
        assert_eq!(
            (o.host.as_str(), o.host_key_alias.as_deref(), o.needs_openssh.as_deref()),
            ("10.0.0.1", None, None)
        );
        let overrides = SshOverrides { config_file: Some(other.clone()), ..Default::default() };
        let SourceSpec::Ssh(o) = SourceSpec::parse("old", &overrides, Some(home.path())).unwrap() else { panic!() };
        assert_eq!(o.host, "10.0.0.2");
        assert_eq!(o.host_key_alias.as_deref(), Some("old-db"));
        assert_eq!(o.needs_openssh.as_deref(), Some("ProxyJump"));
        assert_eq!(o.given.config_file, Some(other));
        let missing = SshOverrides { config_file: Some(home.path().join("nope")), ..Default::default() };
        assert!(SourceSpec::parse("old", &missing, Some(home.path())).is_err());
    }
}
