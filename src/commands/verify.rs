//! `lazyfs verify`: hash every verified file's cached copy again and compare
//! it with the blake3 the journal recorded for it.

use std::path::{Path, PathBuf};

use crate::store::{CacheDir, StoreError, journal};

pub struct Report {
    pub checked: usize,
    /// Files whose cached bytes no longer match, with what is wrong.
    pub mismatched: Vec<(PathBuf, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the journal cannot be read: {reason}")]
    Journal { path: PathBuf, reason: String },
    #[error("{}: not a lazyfs cache dir ({reason})", path.display())]
    NotACache { path: PathBuf, reason: String },
}

/// Re-hashes every file the journal of `cache_dir` says is verified.
pub fn verify_cache(cache_dir: &Path) -> Result<Report, VerifyError> {
    let not_a_cache = |reason: String| VerifyError::NotACache { path: cache_dir.into(), reason };
    let dir = match CacheDir::open_existing_cache(cache_dir) {
        Ok(dir) => dir,
        Err(StoreError::Unsafe { reason, .. }) => return Err(not_a_cache(reason)),
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_a_cache("no such directory".into()));
        }
        Err(e) => return Err(e.into()),
    };
    if !dir.exists(journal::NAME) {
        return Err(not_a_cache("it has no `journal`".into()));
    }
    let records =
        journal::read(&dir)?.map_err(|reason| VerifyError::Journal { path: dir.join(journal::NAME), reason })?;
    let spills = dir.subdir("spill")?;
    let mut report = Report { checked: 0, mismatched: Vec::new() };
    let mut verified: Vec<_> = records.iter().filter_map(|(path, r)| Some((path, r.verified.as_ref()?))).collect();
    verified.sort();
    for (path, (hash, against)) in verified {
        use std::os::unix::ffi::OsStrExt;
        let original = PathBuf::from(std::ffi::OsStr::from_bytes(path));
        let name = crate::store::spill_name(&original);
        report.checked += 1;
        let actual = spills.open_read(&name).and_then(|mut f| {
            let mut hasher = blake3::Hasher::new();
            std::io::copy(&mut f, &mut hasher)?;
            Ok(hasher.finalize())
        });
        match actual {
            Ok(actual) if actual.as_bytes() == hash => {}
            Ok(actual) => report.mismatched.push((
                original,
                format!(
                    "blake3 {} where the {against} said {}",
                    actual.to_hex(),
                    blake3::Hash::from_bytes(*hash).to_hex()
                ),
            )),
            Err(e) => report.mismatched.push((original, format!("{}: {e}", spills.join(&name).display()))),
        }
    }
    Ok(report)
}
