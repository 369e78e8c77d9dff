//! `IMGDIR/lazyfs.pushed`: which indexes `lazyfs push` made of these images.
//!
//! An index is only as trustworthy as the store: whoever can write the
//! prefix could store other bytes under their own names and an index that
//! vouches for them (the images' hash copied from the real one). The images
//! are what the new host trusts (copied from the old host), so the push
//! writes the blake3 of its index next to them, one line per URL
//! (`BLAKE3 s3://BUCKET/PREFIX`), and a mount serves an index only if its
//! blake3 is one of them.

use std::path::{Path, PathBuf};

use super::S3Url;

/// The file's name in the images directory.
pub const NAME: &str = "lazyfs.pushed";

/// The pin file of `imgdir`.
pub fn path(imgdir: &Path) -> PathBuf {
    imgdir.join(NAME)
}

/// Records that the index pushed to `url` has blake3 `id` (hex), replacing
/// what an earlier push to `url` recorded; other URLs' lines stay.
pub fn write(imgdir: &Path, url: &S3Url, id: &str) -> std::io::Result<()> {
    let url = url.to_string();
    let mut lines = match read(imgdir) {
        Ok(lines) => lines,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    lines.retain(|(_, pinned)| *pinned != url);
    lines.push((id.to_string(), url));
    let text: String = lines.iter().map(|(id, url)| format!("{id} {url}\n")).collect();
    let path = path(imgdir);
    // Another push of these images to another URL may write at once: each its own temporary file.
    let tmp = imgdir.join(format!(".{NAME}.{}", std::process::id()));
    let written = create_new(&tmp).and_then(|mut file| {
        use std::io::Write;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    });
    written.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A new file at `path`: whatever is there (left by a push that died, or a
/// symlink planted to make this one write elsewhere) is removed, not followed.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    let open = || std::fs::OpenOptions::new().write(true).create_new(true).open(path);
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// Whether the images in `imgdir` were pushed with the index of blake3 `id`
/// (hex); if not, the one-line reason, saying what to do.
pub fn check(imgdir: &Path, id: &str, source: &str) -> Result<(), String> {
    let path = path(imgdir);
    let push = format!("`lazyfs push {} {source}`", imgdir.display());
    let lines = read(imgdir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{}: not there: {push} writes it (it names the index a mount may trust); copy the images \
             to this host once that push has started",
            path.display()
        ),
        _ => format!("{}: {e}", path.display()),
    })?;
    if lines.iter().any(|(pinned, _)| pinned == id) {
        return Ok(());
    }
    Err(format!(
        "{source}: its {} is not one pushed with {} (not named in {NAME}): pushed again since, or changed \
         in the store; run {push} again and copy {NAME} to this host",
        super::index::INDEX,
        imgdir.display()
    ))
}

/// The file's lines as (blake3, URL); one that is not is an error.
fn read(imgdir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path(imgdir))?;
    text.lines()
        .enumerate()
        .map(|(n, line)| {
            let parsed = line.split_once(' ').filter(|(id, url)| {
                id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) && url.starts_with("s3://")
            });
            parsed.map(|(id, url)| (id.to_ascii_lowercase(), url.to_string())).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("line {} is not `BLAKE3 s3://BUCKET/PREFIX`", n + 1),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_replaces_its_own_line_and_keeps_other_urls() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (S3Url::parse("s3://ckpt/one").unwrap(), S3Url::parse("s3://ckpt/two/").unwrap());
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let err = check(dir.path(), &a, "s3://ckpt/one").unwrap_err();
        assert!(err.contains("lazyfs.pushed: not there") && err.contains("lazyfs push"), "{err}");
        write(dir.path(), &one, &a).unwrap();
        write(dir.path(), &two, &b).unwrap();
        write(dir.path(), &one, &c).unwrap();
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert_eq!(text, format!("{b} s3://ckpt/two\n{c} s3://ckpt/one\n"));
        check(dir.path(), &b, "s3://ckpt/two").unwrap();
        check(dir.path(), &c, "s3://ckpt/one").unwrap();
        let err = check(dir.path(), &a, "s3://ckpt/one").unwrap_err();
        assert!(err.contains("not one pushed with"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious").unwrap();
        let tmp = dir.path().join(format!(".{NAME}.{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        write(dir.path(), &S3Url::parse("s3://ckpt/one").unwrap(), &"a".repeat(64)).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        check(dir.path(), &"a".repeat(64), "s3://ckpt/one").unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "not a pin\n").unwrap();
        let err = check(dir.path(), &"a".repeat(64), "s3://ckpt/one").unwrap_err();
        assert!(err.contains("lazyfs.pushed: line 1 is not"), "{err}");
        assert!(write(dir.path(), &S3Url::parse("s3://ckpt/one").unwrap(), &"a".repeat(64)).is_err());
    }
}
