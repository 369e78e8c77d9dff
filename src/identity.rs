//! A cache dir's identity: what its files are. The checkpoint (its images),
//! the source they come from, and how local changes name them (the layout and
//! the subtree: a local change's path is below the mount's root).
//!
//! A mount that asks for something else never loses a local change silently
//! ([`judge`]): another checkpoint, or local changes made under another
//! layout or subtree, refuse the mount naming `--discard-local-changes`.
//!
//! The source is known two ways. Its spelling, normalized without the network
//! (`source::spelling`: `host` and `user@host:22` are one name), is compared
//! before mounting; a spelling the cache dir does not know yet is not a
//! mismatch. What a connection shows (the host's keys, the real path of the
//! root) is compared on every connection ([`CheckedSource`]): the same source
//! adds the spelling to those known; another one is refused (nothing is
//! fetched from it: the files that need it fail, saying why) and nothing
//! held is discarded.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::namespace::Layout;
use crate::source::{Connection, Shown, Source, SourceError};
use crate::store::journal::Loaded;
pub use crate::store::journal::proto::{CacheIdentity, SourceIdentity};

/// A blake3 of the image files of `imgdir` (see `images::hash_files`), and
/// what a journal older than identities said of them with SOURCE `source`
/// and `--source-root` `source_root` (to take such a cache dir over as it is).
pub fn images_hash(
    imgdir: &Path,
    source: &str,
    source_root: &Path,
) -> Result<(Vec<u8>, Vec<u8>), (PathBuf, std::io::Error)> {
    use std::os::unix::ffi::OsStrExt;
    let mut hasher = blake3::Hasher::new();
    crate::images::hash_files(imgdir, &mut hasher)?;
    let images = hasher.finalize().as_bytes().to_vec();
    for part in [source.as_bytes(), source_root.as_os_str().as_bytes()] {
        hasher.update(&[0]).update(part);
    }
    Ok((images, hasher.finalize().as_bytes().to_vec()))
}

pub fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::Tree => "tree",
        Layout::Flat => "flat",
    }
}

/// `--subtree` as a cache dir's identity names it: without `.`, `..`,
/// repeated or trailing slashes (`/srv/a/` and `/srv/./a` are `/srv/a`).
pub fn subtree_name(subtree: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    crate::source::lexically_absolute(subtree).into_os_string().into_vec()
}

/// What a mount does with what its cache dir holds.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// The files are this mount's.
    Use,
    /// Another checkpoint's files with nothing changed locally (or the
    /// changes are to be dropped): start afresh, for this reason.
    Afresh(String),
    /// Keep the checkpoint's files, drop every local change (asked for).
    Discard,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{}: holds local changes to the files of another checkpoint ({held}) than {wanted}: nothing was changed; \
         mount those images, or give --discard-local-changes to drop the changes and start afresh",
        cache.display()
    )]
    OtherCheckpoint { cache: PathBuf, held: String, wanted: String },
    #[error(
        "{}: holds local changes made with {held}; mounted with {wanted} they would show elsewhere: nothing was \
         changed; mount with {held}, or give --discard-local-changes to drop them",
        cache.display()
    )]
    OtherNames { cache: PathBuf, held: String, wanted: String },
    #[error(
        "{}: holds local changes to files from {held}, not from {wanted}: nothing was changed; mount with that \
         source, or give --discard-local-changes to drop the changes and start afresh from this one",
        cache.display()
    )]
    OtherSource { cache: PathBuf, held: String, wanted: String },
}

/// Whether a mount asking for `wanted` may use what `loaded` (the journal
/// of cache dir `cache`) holds; `legacy`: what a journal older than
/// identities would say of this mount's images and SOURCE; `discard`:
/// `--discard-local-changes`.
pub fn judge(
    cache: &Path,
    loaded: &Loaded,
    (wanted, legacy): (&CacheIdentity, &[u8]),
    discard: bool,
) -> Result<Verdict, IdentityError> {
    let changed = loaded.has_local_changes();
    let other_checkpoint = |held: String| match changed && !discard {
        true => Err(IdentityError::OtherCheckpoint { cache: cache.into(), held, wanted: wanted.imgdir.clone() }),
        false => Ok(Verdict::Afresh(format!("held the files of {held}, not of {}", wanted.imgdir))),
    };
    let Some(held) = &loaded.owner.identity else {
        // No journal, or one an older lazyfs wrote: its owner, if it says one, tells.
        let nothing_held = loaded.records.is_empty() && loaded.local.is_empty();
        return match nothing_held || loaded.owner.legacy == legacy {
            true if discard && changed => Ok(Verdict::Discard),
            true => Ok(Verdict::Use),
            false => other_checkpoint("an unknown checkpoint".into()),
        };
    };
    if held.images != wanted.images {
        return other_checkpoint(format!("the images once in {}", held.imgdir));
    }
    // Told apart without the network (a local directory); a host is checked
    // once connected ([`CheckedSource`]).
    if let (Some(h), Some(w)) = (&held.source, &wanted.source)
        && !h.root.is_empty()
        && !w.root.is_empty()
        && !same_source(h, &w.kind, &w.host_keys, &w.root)
    {
        let (held, wanted) = (h.spellings.join(", "), w.spellings.join(", "));
        return match changed && !discard {
            true => Err(IdentityError::OtherSource { cache: cache.into(), held, wanted }),
            false => Ok(Verdict::Afresh(format!("held files from {held}, not from {wanted}"))),
        };
    }
    if discard {
        return Ok(if changed { Verdict::Discard } else { Verdict::Use });
    }
    let names = |identity: &CacheIdentity| {
        use std::os::unix::ffi::OsStrExt;
        // Normalized again: a journal written before its spelling was.
        let subtree = subtree_name(Path::new(std::ffi::OsStr::from_bytes(&identity.subtree)));
        // Changes relative to / show the same without --subtree, which a user rather means than
        // `--subtree /` (that mirrors the old host's whole root): suggest none.
        match subtree.as_slice() {
            b"/" => format!("--layout {} (no --subtree)", identity.layout),
            _ => format!("--layout {} --subtree {}", identity.layout, String::from_utf8_lossy(&subtree)),
        }
    };
    if !loaded.local.is_empty() && names(held) != names(wanted) {
        return Err(IdentityError::OtherNames { cache: cache.into(), held: names(held), wanted: names(wanted) });
    }
    Ok(Verdict::Use)
}

/// The identity a mount writes: `wanted`, with the source `held` knows
/// when the files are kept (a new spelling is added once a connection confirms it).
pub fn merged(held: Option<&CacheIdentity>, verdict: &Verdict, wanted: CacheIdentity) -> CacheIdentity {
    let held_source = held.and_then(|h| h.source.clone()).filter(|s| !s.spellings.is_empty());
    match (verdict, held_source) {
        (Verdict::Use | Verdict::Discard, Some(source)) => CacheIdentity { source: Some(source), ..wanted },
        _ => wanted,
    }
}

/// Whether `spelling` is one the source is known by.
pub fn knows(identity: &CacheIdentity, spelling: &str) -> bool {
    identity.source.as_ref().is_some_and(|s| s.spellings.iter().any(|known| known == spelling))
}

/// How a connection's source compares with the one a cache dir holds the files of.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The same source.
    Same,
    /// Nothing was known of it yet: it is this one.
    First,
    Other,
}

fn compare(known: &SourceIdentity, shown: &Shown) -> Seen {
    use std::os::unix::ffi::OsStrExt;
    match known.root.is_empty() {
        true => Seen::First,
        false if same_source(known, shown.kind, &shown.host_keys, shown.root.as_os_str().as_bytes()) => Seen::Same,
        false => Seen::Other,
    }
}

/// Whether `known` is the source of that kind, host keys and root: one key
/// in common is the same host (a host has several; where none is known, the
/// root alone tells).
fn same_source(known: &SourceIdentity, kind: &str, host_keys: &[String], root: &[u8]) -> bool {
    let keys_agree =
        known.host_keys.is_empty() || host_keys.is_empty() || host_keys.iter().any(|key| known.host_keys.contains(key));
    known.kind == kind && known.root == root && keys_agree
}

/// What is told of a source a connection confirmed (to journal it).
pub type OnConfirmed = Box<dyn Fn(SourceIdentity) + Send>;

/// A source each of whose connections is checked to reach the source the
/// cache dir holds the files of (see the module's doc).
pub struct CheckedSource {
    inner: Arc<dyn Source>,
    /// SOURCE as this mount spelled it, normalized.
    spelling: String,
    known: Mutex<SourceIdentity>,
    on_confirmed: Mutex<Option<OnConfirmed>>,
    /// Why a connection was refused, once one was.
    refused: Mutex<Option<String>>,
}

impl CheckedSource {
    pub fn new(inner: Arc<dyn Source>, spelling: String, known: SourceIdentity) -> CheckedSource {
        CheckedSource {
            inner,
            spelling,
            known: Mutex::new(known),
            on_confirmed: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// What is known of the source now.
    pub fn known(&self) -> SourceIdentity {
        self.known.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// `tell` hears of each later change to what is known (a spelling confirmed).
    pub fn on_confirmed(&self, tell: OnConfirmed) {
        *self.on_confirmed.lock().unwrap_or_else(PoisonError::into_inner) = Some(tell);
    }

    fn check(&self, shown: &Shown) -> Result<(), SourceError> {
        use std::os::unix::ffi::OsStrExt;
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        match compare(&known, shown) {
            Seen::Other => {
                let message = self.mismatch(&known, shown);
                *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(message.clone());
                return Err(SourceError::NotTheSource(message));
            }
            Seen::First => {
                known.kind = shown.kind.to_string();
                known.root = shown.root.as_os_str().as_bytes().to_vec();
                known.host_keys = shown.host_keys.clone();
            }
            Seen::Same if known.spellings.contains(&self.spelling) => return Ok(()),
            Seen::Same => log::info!("{} is the source this cache dir was filled from", self.spelling),
        }
        if !known.spellings.contains(&self.spelling) {
            known.spellings.push(self.spelling.clone());
        }
        if let Some(tell) = self.on_confirmed.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            tell(known.clone());
        }
        Ok(())
    }

    fn mismatch(&self, known: &SourceIdentity, shown: &Shown) -> String {
        let root = |kind: &str, root: &Path, keys: usize| match kind {
            "local" => format!("the directory {}", root.display()),
            _ => format!("{} on a host with {keys} known key(s)", root.display()),
        };
        use std::os::unix::ffi::OsStrExt;
        let held = Path::new(std::ffi::OsStr::from_bytes(&known.root));
        format!(
            "{} ({}) is not the source this cache dir was filled from ({}, known as {}): nothing is fetched from \
             it; mount with that source, or give --discard-local-changes to start the cache dir afresh from this one",
            self.spelling,
            root(shown.kind, &shown.root, shown.host_keys.len()),
            root(&known.kind, held, known.host_keys.len()),
            known.spellings.join(", "),
        )
    }
}

impl CheckedSource {
    /// `connection`, once it showed it reached the source (where it can tell).
    fn checked(&self, connection: Box<dyn Connection>) -> Result<Box<dyn Connection>, SourceError> {
        match connection.shows() {
            Some(shown) => self.check(&shown).map(|()| connection),
            None => Ok(connection),
        }
    }
}

impl Source for CheckedSource {
    fn connect_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        self.checked(self.inner.connect_within(time)?)
    }

    fn connect_bulk_within(&self, time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        self.checked(self.inner.connect_bulk_within(time)?)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn idle(&self) {
        self.inner.idle()
    }

    fn refusal(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn pushed(&self) -> Option<&crate::s3::index::Index> {
        self.inner.pushed()
    }
}

/// A source that could not be opened, for a mount that does not need it
/// (every file is in the cache dir): each connection fails, saying why.
pub struct Unopened {
    pub name: String,
    pub reason: String,
}

impl Source for Unopened {
    fn connect_within(&self, _time: Duration) -> Result<Box<dyn Connection>, SourceError> {
        Err(SourceError::Connect { addr: self.name.clone(), source: std::io::Error::other(self.reason.clone()) })
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal::proto::Local;
    use crate::store::journal::{FileRecord, Owner};

    fn identity(images: &[u8], subtree: &str) -> CacheIdentity {
        CacheIdentity {
            images: images.to_vec(),
            imgdir: format!("/images/{}", String::from_utf8_lossy(images)),
            layout: "tree".into(),
            subtree: subtree.as_bytes().to_vec(),
            source: None,
        }
    }

    fn held(identity: CacheIdentity, local: usize, modified: bool) -> Loaded {
        let owner = Owner { identity: Some(identity), created_ns: 1, legacy: Vec::new() };
        let mut loaded = Loaded { owner, ..Loaded::default() };
        loaded.local = vec![Local::default(); local];
        loaded.records.insert(b"/f".to_vec(), FileRecord { modified, size: 1, ..FileRecord::default() });
        loaded
    }

    #[test]
    fn another_checkpoint_starts_afresh_unless_something_changed_locally() {
        let cache = Path::new("/c");
        let other = identity(b"b", "/");
        assert!(matches!(
            judge(cache, &held(identity(b"a", "/"), 0, false), (&other, b""), false),
            Ok(Verdict::Afresh(_))
        ));
        for (local, modified) in [(1, false), (0, true)] {
            let loaded = held(identity(b"a", "/"), local, modified);
            let refused = judge(cache, &loaded, (&other, b""), false).unwrap_err().to_string();
            assert!(refused.contains("--discard-local-changes"), "{refused}");
            assert!(matches!(judge(cache, &loaded, (&other, b""), true), Ok(Verdict::Afresh(_))));
        }
        let mut older = Loaded { local: vec![Local::default()], ..Loaded::default() };
        older.owner.legacy = b"what it said".to_vec();
        assert!(judge(cache, &older, (&other, b"not that"), false).is_err());
        assert_eq!(judge(cache, &older, (&other, b"what it said"), false).unwrap(), Verdict::Use);
        assert_eq!(judge(cache, &Loaded::default(), (&other, b""), false).unwrap(), Verdict::Use);
    }

    #[test]
    fn another_local_directory_is_told_apart_before_mounting() {
        let cache = Path::new("/c");
        let source = |root: &str| SourceIdentity {
            spellings: vec![format!("file://{root}")],
            kind: "local".into(),
            root: root.as_bytes().to_vec(),
            host_keys: Vec::new(),
        };
        let at = |root: &str| CacheIdentity { source: Some(source(root)), ..identity(b"a", "/") };
        let refused = judge(cache, &held(at("/old"), 1, false), (&at("/empty"), b""), false).unwrap_err().to_string();
        assert!(refused.contains("file:///old") && refused.contains("--discard-local-changes"), "{refused}");
        assert!(matches!(
            judge(cache, &held(at("/old"), 0, false), (&at("/empty"), b""), false),
            Ok(Verdict::Afresh(_))
        ));
        assert_eq!(judge(cache, &held(at("/old"), 1, true), (&at("/old"), b""), false).unwrap(), Verdict::Use);
        // A host: told once connected.
        let host = CacheIdentity {
            source: Some(SourceIdentity { spellings: vec!["ssh://u@h:22/".into()], ..SourceIdentity::default() }),
            ..identity(b"a", "/")
        };
        assert_eq!(judge(cache, &held(at("/old"), 1, true), (&host, b""), false).unwrap(), Verdict::Use);
    }

    #[test]
    fn local_changes_under_another_subtree_refuse_writes_alone_do_not() {
        let cache = Path::new("/c");
        let (a, b) = (identity(b"x", "/srv/a"), identity(b"x", "/srv/b"));
        let refused = judge(cache, &held(a.clone(), 1, false), (&b, b""), false).unwrap_err().to_string();
        assert!(refused.contains("--subtree /srv/a") && refused.contains("--discard-local-changes"), "{refused}");
        assert_eq!(judge(cache, &held(a.clone(), 0, true), (&b, b""), false).unwrap(), Verdict::Use);
        assert_eq!(judge(cache, &held(a.clone(), 1, true), (&b, b""), true).unwrap(), Verdict::Discard);
        assert_eq!(judge(cache, &held(a.clone(), 1, false), (&a, b""), false).unwrap(), Verdict::Use);
    }

    fn shown(kind: &'static str, keys: &[&str], root: &str) -> Shown {
        Shown { kind, host_keys: keys.iter().map(|k| k.to_string()).collect(), root: root.into() }
    }

    #[test]
    fn a_connection_confirms_a_spelling_or_is_refused() {
        struct Fixed(Shown);
        struct Conn(Shown);
        impl Connection for Conn {
            fn shows(&self) -> Option<Shown> {
                Some(self.0.clone())
            }
            fn stat(&mut self, _: &Path) -> Result<crate::source::SourceStat, SourceError> {
                unreachable!()
            }
            fn read_exact_at(&mut self, _: &Path, _: u64, _: u64, _: &mut [u8]) -> Result<(), SourceError> {
                unreachable!()
            }
        }
        impl Source for Fixed {
            fn connect_within(&self, _: Duration) -> Result<Box<dyn Connection>, SourceError> {
                Ok(Box::new(Conn(self.0.clone())))
            }
            fn describe(&self) -> String {
                "fixed".into()
            }
        }
        let first = shown("ssh", &["ssh-ed25519 AAA", "ssh-rsa BBB"], "/srv");
        let told = Arc::new(Mutex::new(Vec::new()));
        let source = CheckedSource::new(Arc::new(Fixed(first)), "ssh://u@h:22/srv".into(), SourceIdentity::default());
        let record = told.clone();
        source.on_confirmed(Box::new(move |s| record.lock().unwrap().push(s)));
        source.connect().unwrap();
        source.connect().unwrap();
        let known = source.known();
        assert_eq!((known.kind.as_str(), known.root.as_slice()), ("ssh", b"/srv".as_slice()));
        assert_eq!(told.lock().unwrap().len(), 1, "told once");

        // Another spelling, the same host (one key in common) and root: confirmed.
        let same = Fixed(shown("ssh", &["ssh-ed25519 AAA"], "/srv"));
        let source = CheckedSource::new(Arc::new(same), "ssh://u@localhost:22/srv".into(), known.clone());
        source.connect().unwrap();
        assert_eq!(source.known().spellings, ["ssh://u@h:22/srv", "ssh://u@localhost:22/srv"]);

        for other in [
            shown("ssh", &["ssh-ed25519 CCC"], "/srv"),
            shown("ssh", &["ssh-ed25519 AAA"], "/srv/other"),
            shown("local", &[], "/srv"),
        ] {
            let source = CheckedSource::new(Arc::new(Fixed(other)), "ssh://u@x:22/srv".into(), known.clone());
            let Err(SourceError::NotTheSource(message)) = source.connect() else { panic!("not refused") };
            assert!(message.contains("--discard-local-changes"), "{message}");
            assert_eq!(source.refusal(), Some(message), "said in status");
            assert_eq!(source.known(), known, "nothing learnt from another source");
        }
    }
}
