//! A local directory holding the old host's root (a snapshot, a mounted disk).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Connection, Source, SourceError, SourceStat, WholeRead, relative};

pub struct LocalSource {
    root: PathBuf,
}

impl LocalSource {
    pub fn new(root: &Path) -> Result<Self, SourceError> {
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => Ok(LocalSource { root: root.to_path_buf() }),
            Ok(_) => Err(SourceError::Config(format!("{}: not a directory", root.display()))),
            Err(source) => Err(SourceError::Io { path: root.to_path_buf(), source }),
        }
    }
}

impl Source for LocalSource {
    fn connect_within(&self, _time: std::time::Duration) -> Result<Box<dyn Connection>, SourceError> {
        Ok(Box::new(LocalConnection { root: self.root.clone(), open: None }))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

struct LocalConnection {
    root: PathBuf,
    /// The last file read, and in which generation: consecutive reads of one
    /// file reuse its descriptor.
    open: Option<(PathBuf, u64, File)>,
}

impl LocalConnection {
    fn full(&self, path: &Path) -> PathBuf {
        self.root.join(relative(path))
    }

    fn file(&mut self, path: &Path, generation: u64) -> Result<&File, SourceError> {
        if self.open.as_ref().is_none_or(|(p, g, _)| p != path || *g != generation) {
            // O_NONBLOCK: a FIFO where the file was must not block the open
            // (it has no effect on a regular file's reads).
            let full = self.full(path);
            let file = File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&full)
                .map_err(|e| io_error(path, &full, e))?;
            if !file.metadata().map_err(|e| io_error(path, &full, e))?.is_file() {
                return Err(io_error(path, &full, std::io::Error::other("not a regular file on the source")));
            }
            self.open = Some((path.to_path_buf(), generation, file));
        }
        Ok(&self.open.as_ref().expect("just opened").2)
    }
}

impl Connection for LocalConnection {
    fn stat(&mut self, path: &Path) -> Result<SourceStat, SourceError> {
        let full = self.full(path);
        let meta = std::fs::metadata(&full).map_err(|e| io_error(path, &full, e))?;
        Ok(SourceStat { size: meta.len(), mtime: meta.mtime() })
    }

    fn read_exact_at(&mut self, path: &Path, generation: u64, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let file = self.file(path, generation)?;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(SourceError::Short {
                        path: path.to_path_buf(),
                        end: offset + done as u64,
                        wanted: offset + buf.len() as u64,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(path, &self.full(path), e)),
            }
        }
        Ok(())
    }

    /// Like SSH's pipeline, each whole read also shows a file that grew.
    fn read_files(&mut self, files: &mut [WholeRead<'_>]) -> Result<(), SourceError> {
        for file in files.iter_mut() {
            let size = file.buf.len() as u64;
            file.result = self.read_exact_at(file.path, 0, 0, file.buf).and_then(|()| {
                match self.has_byte_at(file.path, size)? {
                    true => Err(SourceError::Longer { path: file.path.to_path_buf(), size }),
                    false => Ok(()),
                }
            });
        }
        Ok(())
    }
}

impl LocalConnection {
    /// Whether the file has a byte at `offset` (it grew past a recorded size).
    fn has_byte_at(&mut self, path: &Path, offset: u64) -> Result<bool, SourceError> {
        let file = self.file(path, 0)?;
        loop {
            match file.read_at(&mut [0u8], offset) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(path, &self.full(path), e)),
            }
        }
    }
}

fn io_error(path: &Path, full: &Path, source: std::io::Error) -> SourceError {
    if source.kind() == std::io::ErrorKind::NotFound {
        SourceError::NotFound { path: path.to_path_buf(), looked: full.display().to_string() }
    } else {
        SourceError::Io { path: path.to_path_buf(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/b c"), b"0123456789").unwrap();
        let source = LocalSource::new(dir.path()).unwrap();
        let mut conn = source.connect().unwrap();
        assert_eq!(conn.stat(Path::new("/a/b c")).unwrap().size, 10);
        let mut buf = [0u8; 4];
        conn.read_exact_at(Path::new("/a/b c"), 0, 3, &mut buf).unwrap();
        assert_eq!(&buf, b"3456");
        let err = conn.read_exact_at(Path::new("/a/b c"), 0, 8, &mut buf).unwrap_err();
        assert!(matches!(err, SourceError::Short { end: 10, wanted: 12, .. }), "{err}");
        let err = conn.stat(Path::new("/missing")).unwrap_err();
        assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    }
}
