//! OpenSSH `known_hosts` files: plain and hashed (`|1|salt|hash`) host
//! patterns, `[host]:port` entries, negation and wildcards, `@revoked`.
//!
//! libssh2's own check compares a key against entries of any key type, so a
//! host known by its ed25519 key looks "changed" when the session negotiated
//! ECDSA; this one compares like OpenSSH, type by type, and tells the session
//! which key types to prefer.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use super::SourceError;

pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
}

struct Entry {
    revoked: bool,
    patterns: Vec<Pattern>,
    key_type: String,
    key: Vec<u8>,
}

enum Pattern {
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
    Plain { glob: String, negated: bool },
}

#[derive(Debug, PartialEq, Eq)]
pub enum HostKeyCheck {
    Match,
    /// The file has a key of this type for the host, and it is another key.
    Mismatch,
    Revoked,
    NotFound,
}

/// How known_hosts names a host: `host`, or `[host]:port` off port 22.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

/// A public key as known_hosts writes it: `TYPE BASE64`.
pub fn public_key(key_type: &str, blob: &[u8]) -> String {
    format!("{key_type} {}", STANDARD.encode(blob))
}

/// The key type a public key blob starts with (`ssh-ed25519`, ...).
pub fn blob_key_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4usize.checked_add(len)?)?;
    String::from_utf8(name.to_vec()).ok()
}

impl KnownHosts {
    /// Reads `path`; a missing file knows no host. Lines it cannot parse are skipped, as OpenSSH does.
    pub fn load(path: &Path) -> Result<Self, SourceError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(SourceError::Io { path: path.to_path_buf(), source });
            }
        };
        let entries = text.lines().filter_map(parse_line).collect();
        Ok(KnownHosts { path: path.to_path_buf(), entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key types recorded for `name`, in file order.
    pub fn key_types(&self, name: &str) -> Vec<String> {
        let mut types: Vec<String> = Vec::new();
        for entry in self.entries.iter().filter(|e| !e.revoked && e.matches(name)) {
            if !types.contains(&entry.key_type) {
                types.push(entry.key_type.clone());
            }
        }
        types
    }

    /// The keys recorded for `name` (not revoked), as `TYPE BASE64`.
    pub fn keys(&self, name: &str) -> Vec<String> {
        let keys = self.entries.iter().filter(|e| !e.revoked && e.matches(name));
        keys.map(|e| public_key(&e.key_type, &e.key)).collect()
    }

    pub fn check(&self, name: &str, blob: &[u8]) -> HostKeyCheck {
        let Some(key_type) = blob_key_type(blob) else {
            return HostKeyCheck::NotFound;
        };
        if self.entries.iter().any(|e| e.revoked && e.key == blob) {
            return HostKeyCheck::Revoked;
        }
        let mut result = HostKeyCheck::NotFound;
        for entry in self.entries.iter().filter(|e| !e.revoked && e.key_type == key_type && e.matches(name)) {
            if entry.key == blob {
                return HostKeyCheck::Match;
            }
            result = HostKeyCheck::Mismatch;
        }
        result
    }

    /// Appends `name`'s key, creating the file (0600) and its directory (0700) if needed.
    pub fn append(&mut self, name: &str, blob: &[u8]) -> Result<(), SourceError> {
        let key_type = blob_key_type(blob).unwrap_or_default();
        let line = format!("{name} {key_type} {}\n", STANDARD.encode(blob));
        let io = |source| SourceError::Io { path: self.path.clone(), source };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path).map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)?;
        self.entries.extend(parse_line(&line));
        Ok(())
    }
}

impl Entry {
    /// OpenSSH's rule: a negated pattern that matches wins; otherwise any match.
    fn matches(&self, name: &str) -> bool {
        let mut matched = false;
        for pattern in &self.patterns {
            match pattern {
                Pattern::Hashed { salt, hash } => matched |= hashed(salt, name).as_deref() == Some(hash),
                Pattern::Plain { glob, negated } => {
                    if wildmatch::WildMatch::new(glob).matches(name) {
                        if *negated {
                            return false;
                        }
                        matched = true;
                    }
                }
            }
        }
        matched
    }
}

fn hashed(salt: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut mac = Hmac::<Sha1>::new_from_slice(salt).ok()?;
    mac.update(name.as_bytes());
    Some(mac.finalize().into_bytes().to_vec())
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let mut revoked = false;
    if first.starts_with('@') {
        // @cert-authority lines name CAs, not host keys: lazyfs does not use them.
        revoked = match first {
            "@revoked" => true,
            _ => return None,
        };
        first = fields.next()?;
    }
    let key_type = fields.next()?.to_string();
    let key = STANDARD.decode(fields.next()?).ok()?;
    let patterns = first
        .split(',')
        .filter_map(|p| {
            if let Some(hashed) = p.strip_prefix("|1|") {
                let (salt, hash) = hashed.split_once('|')?;
                Some(Pattern::Hashed { salt: STANDARD.decode(salt).ok()?, hash: STANDARD.decode(hash).ok()? })
            } else if let Some(glob) = p.strip_prefix('!') {
                Some(Pattern::Plain { glob: glob.to_string(), negated: true })
            } else {
                Some(Pattern::Plain { glob: p.to_string(), negated: false })
            }
        })
        .collect();
    Some(Entry { revoked, patterns, key_type, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(key_type: &str, body: &[u8]) -> Vec<u8> {
        let mut b = (key_type.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(key_type.as_bytes());
        b.extend_from_slice(body);
        b
    }

    fn hashed_pattern(name: &str) -> String {
        let salt = b"0123456789abcdefghij";
        format!("|1|{}|{}", STANDARD.encode(salt), STANDARD.encode(hashed(salt, name).unwrap()))
    }

    fn known(text: &str) -> KnownHosts {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, text).unwrap();
        KnownHosts::load(&path).unwrap()
    }

    #[test]
    fn checks_by_key_type() {
        let ed = blob("ssh-ed25519", b"ed-key");
        let ecdsa = blob("ecdsa-sha2-nistp256", b"ec-key");
        let kh = known(&format!("# comment\n[127.0.0.1]:2222 ssh-ed25519 {}\n", STANDARD.encode(&ed)));
        assert_eq!(kh.check("[127.0.0.1]:2222", &ed), HostKeyCheck::Match);
        // Another type is unknown, not changed: the session should prefer ed25519.
        assert_eq!(kh.check("[127.0.0.1]:2222", &ecdsa), HostKeyCheck::NotFound);
        assert_eq!(kh.key_types("[127.0.0.1]:2222"), vec!["ssh-ed25519".to_string()]);
        assert_eq!(kh.check("[127.0.0.1]:2222", &blob("ssh-ed25519", b"other")), HostKeyCheck::Mismatch);
        assert_eq!(kh.check("127.0.0.1", &ed), HostKeyCheck::NotFound);
        assert_eq!(kh.keys("[127.0.0.1]:2222"), vec![public_key("ssh-ed25519", &ed)]);
        assert!(kh.keys("127.0.0.1").is_empty());
    }

    #[test]
    fn hashed_wildcard_negated_and_revoked() {
        let key = blob("ssh-ed25519", b"k");
        let text = format!(
            "{} ssh-ed25519 {k}\n*.example.com,!bad.example.com ssh-ed25519 {k}\n@revoked * ssh-ed25519 {r}\n",
            hashed_pattern("old-host"),
            k = STANDARD.encode(&key),
            r = STANDARD.encode(blob("ssh-ed25519", b"revoked")),
        );
        let kh = known(&text);
        assert_eq!(kh.check("old-host", &key), HostKeyCheck::Match);
        assert_eq!(kh.check("a.example.com", &key), HostKeyCheck::Match);
        assert_eq!(kh.check("bad.example.com", &key), HostKeyCheck::NotFound);
        assert_eq!(kh.check("old-host", &blob("ssh-ed25519", b"revoked")), HostKeyCheck::Revoked);
    }

    #[test]
    fn append_creates_and_then_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/known_hosts");
        let mut kh = KnownHosts::load(&path).unwrap();
        let key = blob("ssh-ed25519", b"new");
        assert_eq!(kh.check("h", &key), HostKeyCheck::NotFound);
        kh.append("h", &key).unwrap();
        assert_eq!(KnownHosts::load(&path).unwrap().check("h", &key), HostKeyCheck::Match);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
