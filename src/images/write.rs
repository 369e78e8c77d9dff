//! Writes a minimal CRIU image directory for a set of files: one process that
//! has each file open. Tests and benchmarks use it to make checkpoints of
//! data they generate; real dumps come from `criu dump`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::framing::{self, encode_entries};
use super::proto::{
    CoreEntry, FdinfoEntry, FileEntry, FownEntry, FsEntry, InventoryEntry, MmEntry, PstreeEntry, RegFileEntry,
    TaskCoreEntry, TaskKobjIdsEntry,
};

/// A file the written dump records as open.
#[derive(Debug, Clone)]
pub struct DumpFile {
    pub path: PathBuf,
    /// `None` as CRIU writes for O_APPEND opens: the mount asks the source.
    pub size: Option<u64>,
    pub mode: u32,
    /// The open flags recorded for it (`O_RDWR`: the process could write it).
    pub flags: u32,
}

impl DumpFile {
    pub fn new(path: impl Into<PathBuf>, size: u64) -> Self {
        DumpFile { path: path.into(), size: Some(size), mode: 0o100644, flags: 0 }
    }
}

const PID: u32 = 4242;
const FD_TYPE_REG: u32 = 1;

/// Writes the images of one process (pid 4242) holding `files` open as fds
/// 3, 4, ... into `dir`, in the modern format (`files.img`).
pub fn write_dump(dir: &Path, files: &[DumpFile]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let reg = |id: u32, path: &Path, size: Option<u64>, mode: u32, flags: u32| FileEntry {
        r#type: FD_TYPE_REG,
        id,
        reg: Some(RegFileEntry {
            id,
            flags,
            pos: 0,
            fown: FownEntry::default(),
            name: path.as_os_str().as_bytes().to_vec(),
            size,
            mode: Some(mode),
            ..Default::default()
        }),
    };
    let root_id = files.len() as u32 + 1;
    let mut entries: Vec<FileEntry> =
        files.iter().enumerate().map(|(i, f)| reg(i as u32 + 1, &f.path, f.size, f.mode, f.flags)).collect();
    entries.push(reg(root_id, Path::new("/"), None, 0o40755, 0));
    let fds: Vec<FdinfoEntry> = (0..files.len() as u32)
        .map(|i| FdinfoEntry { id: i + 1, flags: 0, r#type: FD_TYPE_REG, fd: i + 3, ..Default::default() })
        .collect();
    let ids = TaskKobjIdsEntry { vm_id: 1, files_id: 1, fs_id: 1, sighand_id: 1, ..Default::default() };
    // The process's executable: the first file, or the root for an empty dump.
    let exe_file_id = if files.is_empty() { root_id } else { 1 };

    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.join(name), bytes);
    write(
        "inventory.img",
        encode_entries(
            framing::INVENTORY,
            &[InventoryEntry { img_version: 2, fdinfo_per_id: Some(true), ..Default::default() }],
        ),
    )?;
    write(
        "pstree.img",
        encode_entries(framing::PSTREE, &[PstreeEntry { pid: PID, ppid: 0, pgid: PID, sid: PID, threads: vec![PID] }]),
    )?;
    write(
        &format!("core-{PID}.img"),
        encode_entries(
            framing::CORE,
            &[CoreEntry { tc: Some(TaskCoreEntry { task_state: Some(1) }), ids: Some(ids), ..Default::default() }],
        ),
    )?;
    write("files.img", encode_entries(framing::FILES, &entries))?;
    write("fdinfo-1.img", encode_entries(framing::FDINFO, &fds))?;
    write(&format!("mm-{PID}.img"), encode_entries(framing::MM, &[MmEntry { exe_file_id, ..Default::default() }]))?;
    write(&format!("fs-{PID}.img"), encode_entries(framing::FS, &[FsEntry { cwd_id: root_id, root_id, umask: None }]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::Checkpoint;

    #[test]
    fn written_dumps_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            DumpFile::new("/data/a b", 10),
            DumpFile { path: "/log".into(), size: None, mode: 0o100600, flags: 0 },
        ];
        write_dump(dir.path(), &files).unwrap();
        let checkpoint = Checkpoint::load(dir.path()).unwrap();
        let servable: Vec<_> = checkpoint.servable().map(|f| (f.path.clone(), f.size, f.mode)).collect();
        assert_eq!(
            servable,
            vec![(PathBuf::from("/data/a b"), Some(10), Some(0o100644)), (PathBuf::from("/log"), None, Some(0o100600))]
        );
    }
}
