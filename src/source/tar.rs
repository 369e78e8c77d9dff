//! Many small files as one stream: `tar` on the old host reads the names,
//! NUL-separated, from its stdin and writes one archive. The command line is
//! fixed; no name is ever part of it. Each file's size comes from its header
//! and must be what lazyfs expects; tar's own check that a file did not change
//! while it was read (its exit status 1) and any other failure send the whole
//! batch through SFTP instead, as does an account that may not run commands
//! (`ForceCommand internal-sftp`), which is then not asked again.

use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::sftp::{FileRead, SftpError};
use super::ssh::Remote;

/// `--verbatim-files-from`: a name is never taken for an option;
/// `--no-recursion`: a directory is not expanded; `--hard-dereference`: a
/// second name of one inode comes with its bytes too.
pub(super) const COMMAND: &str = "tar --null --verbatim-files-from --no-recursion --hard-dereference -T - -cf -";

const BLOCK: usize = 512;
/// Longest long name or pax header accepted.
const MAX_META: u64 = 64 << 10;

/// Whether `tar` may still be tried on this source (shared by its connections).
#[derive(Debug)]
pub(super) struct TarUse {
    allowed: AtomicBool,
}

impl Default for TarUse {
    fn default() -> Self {
        TarUse { allowed: AtomicBool::new(true) }
    }
}

impl TarUse {
    pub(super) fn allowed(&self) -> bool {
        self.allowed.load(Ordering::Relaxed)
    }

    fn refuse(&self, host: &str, why: &str) {
        if self.allowed.swap(false, Ordering::Relaxed) {
            log::info!("{host} does not run tar for this account ({why}): small files go through SFTP");
        }
    }
}

/// Reads what it can of `reads` through one `tar`, each wait on the host
/// bounded by `wait`; returns the indices (the first of each pair) of the
/// files left for SFTP: those not in the stream (missing, unreadable, not
/// regular files), or all of them. A wait that runs out is `TimedOut`: the
/// connection is lost.
pub(super) fn read_files(
    remote: &mut dyn Remote,
    wait: Duration,
    tar: &TarUse,
    host: &str,
    reads: &mut [(usize, FileRead<'_>)],
) -> Result<Vec<usize>, SftpError> {
    let all: Vec<usize> = reads.iter().map(|(i, _)| *i).collect();
    let mut command = match remote.exec(COMMAND, wait) {
        Ok(command) => command,
        Err(why) => {
            tar.refuse(host, &why);
            return Ok(all);
        }
    };
    let mut names = Vec::new();
    for (_, read) in reads.iter() {
        names.extend_from_slice(read.path.as_os_str().as_bytes());
        names.push(0);
    }
    if let Err(e) = command.send_all_and_close(&names) {
        log::debug!("tar on {host}: sending the names: {e}");
    }
    let mut stream = BufReader::with_capacity(256 << 10, command);
    let parsed = parse(&mut stream, reads);
    if let Err(Parse::TimedOut) = parsed {
        stream.get_ref().cut();
        reset(reads, all);
        return Err(SftpError::TimedOut);
    }
    // Whatever is left (the end-of-archive padding) goes unread.
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    let status = stream.into_inner().exit_status();
    let seen = match (parsed, status) {
        (Ok(seen), Ok(Some(0))) => seen,
        (Err(Parse::NotTar), status) => {
            // 255: ssh itself failed (a lost connection), not the account's rule.
            if !matches!(status, Ok(Some(255))) {
                tar.refuse(host, &format!("not a tar stream, exit status {status:?}"));
            }
            return Ok(reset(reads, all));
        }
        (parsed, status) => {
            let why = match parsed {
                Err(Parse::Bad(why)) => why,
                _ => "complete".into(),
            };
            log::info!("tar on {host}: stream {why}, exit status {status:?}: this batch goes through SFTP");
            return Ok(reset(reads, all));
        }
    };
    Ok(reads.iter().zip(seen).filter(|(_, seen)| !seen).map(|((i, _), _)| *i).collect())
}

/// Clears what a failed stream set, leaving every file to SFTP.
fn reset(reads: &mut [(usize, FileRead<'_>)], all: Vec<usize>) -> Vec<usize> {
    for (_, read) in reads.iter_mut() {
        read.result = Ok(());
    }
    all
}

#[derive(Debug)]
enum Parse {
    /// The first block is not a tar header: nothing of tar's came.
    NotTar,
    /// The stream broke or made no sense after it began.
    Bad(String),
    /// The host said nothing for longer than the wait allowed.
    TimedOut,
}

impl From<std::io::Error> for Parse {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::TimedOut => Parse::TimedOut,
            _ => Parse::Bad(e.to_string()),
        }
    }
}

/// One header's facts, long names and pax records applied.
struct Header {
    name: Vec<u8>,
    size: u64,
    kind: u8,
}

/// Reads the archive, filling the buffers of the files it holds; returns
/// which files were in it.
fn parse(stream: &mut impl Read, reads: &mut [(usize, FileRead<'_>)]) -> Result<Vec<bool>, Parse> {
    let expected: Vec<&[u8]> = reads.iter().map(|(_, r)| member_name(r.path.as_os_str().as_bytes())).collect();
    let mut seen = vec![false; reads.len()];
    let mut next = 0;
    let mut first = true;
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax: Option<Pax> = None;
    loop {
        let mut block = [0u8; BLOCK];
        match read_block(stream, &mut block) {
            Ok(false) | Err(Parse::Bad(_)) if first => return Err(Parse::NotTar),
            Ok(false) => return Err(Parse::Bad("the stream ended before the end of the archive".into())),
            Ok(true) => {}
            Err(e) => return Err(e),
        }
        if block.iter().all(|&b| b == 0) {
            if first {
                return Err(Parse::NotTar);
            }
            return Ok(seen);
        }
        let Some(mut header) = header(&block) else {
            return Err(if first { Parse::NotTar } else { Parse::Bad("a damaged header".into()) });
        };
        first = false;
        match header.kind {
            b'L' | b'x' | b'g' => {
                if header.size > MAX_META {
                    return Err(Parse::Bad(format!("a {}-byte extended header", header.size)));
                }
                let mut data = vec![0u8; header.size as usize];
                stream.read_exact(&mut data)?;
                skip(stream, padding(header.size))?;
                match header.kind {
                    b'L' => long_name = Some(data.split(|&b| b == 0).next().unwrap_or_default().to_vec()),
                    b'x' => pax = Some(Pax::parse(&data)),
                    _ => {}
                }
                continue;
            }
            _ => {}
        }
        if let Some(name) = long_name.take() {
            header.name = name;
        }
        if let Some(pax) = pax.take() {
            header.name = pax.path.unwrap_or(header.name);
            header.size = pax.size.unwrap_or(header.size);
        }
        let regular = matches!(header.kind, b'0' | 0 | b'7');
        // Only regular files carry data; tar keeps the order of the names.
        let found = expected[next..].iter().position(|name| *name == header.name.as_slice()).map(|at| next + at);
        match found {
            Some(index) if regular => {
                let read = &mut reads[index].1;
                let wanted = read.buf.len() as u64;
                if header.size == wanted {
                    stream.read_exact(read.buf)?;
                } else {
                    read.result = Err(if header.size > wanted {
                        SftpError::Longer
                    } else {
                        SftpError::Short { end: header.size }
                    });
                    skip(stream, header.size)?;
                }
                skip(stream, padding(header.size))?;
                seen[index] = true;
                next = index + 1;
            }
            _ => {
                let data = if regular { header.size } else { 0 };
                skip(stream, data + padding(data))?;
            }
        }
    }
}

/// The name tar gives a member: the path without its leading slashes.
fn member_name(path: &[u8]) -> &[u8] {
    let start = path.iter().position(|&b| b != b'/').unwrap_or(path.len());
    &path[start..]
}

/// Fills `block`; false at a clean end of the stream.
fn read_block(stream: &mut impl Read, block: &mut [u8; BLOCK]) -> Result<bool, Parse> {
    let mut filled = 0;
    while filled < BLOCK {
        match stream.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(Parse::Bad("the stream ended inside a header".into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn skip(stream: &mut impl Read, len: u64) -> Result<(), Parse> {
    let skipped = std::io::copy(&mut stream.take(len), &mut std::io::sink())?;
    if skipped < len {
        return Err(Parse::Bad("the stream ended inside a member".into()));
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A ustar or GNU header whose checksum holds.
fn header(block: &[u8; BLOCK]) -> Option<Header> {
    let recorded = number(&block[148..156])?;
    let unsigned: u64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    if recorded != unsigned {
        return None;
    }
    let field = |range: std::ops::Range<usize>| {
        let bytes = &block[range];
        bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())].to_vec()
    };
    let mut name = field(0..100);
    // POSIX ustar splits long names into prefix/name; GNU uses that space otherwise.
    if &block[257..263] == b"ustar\0" {
        let prefix = field(345..500);
        if !prefix.is_empty() {
            name = [prefix.as_slice(), b"/", name.as_slice()].concat();
        }
    }
    Some(Header { name, size: number(&block[124..136])?, kind: block[156] })
}

/// A numeric field: octal text, or base-256 when the high bit is set.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        return field[1..]
            .iter()
            .try_fold(u64::from(field[0] & 0x7f), |n, &b| n.checked_mul(256)?.checked_add(u64::from(b)));
    }
    let text = std::str::from_utf8(field).ok()?.trim_matches(|c| c == ' ' || c == '\0');
    u64::from_str_radix(text, 8).ok()
}

/// The records of a pax extended header that matter here.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    size: Option<u64>,
}

impl Pax {
    /// Records are `LEN KEY=VALUE\n`, LEN counting the whole record.
    fn parse(mut data: &[u8]) -> Pax {
        let mut pax = Pax::default();
        while let Some(space) = data.iter().position(|&b| b == b' ') {
            let Some(len) = std::str::from_utf8(&data[..space]).ok().and_then(|l| l.parse::<usize>().ok()) else {
                break;
            };
            let Some(record) = data.get(space + 1..len).and_then(|r| r.strip_suffix(b"\n")) else {
                break;
            };
            if let Some(eq) = record.iter().position(|&b| b == b'=') {
                let (key, value) = (&record[..eq], &record[eq + 1..]);
                match key {
                    b"path" => pax.path = Some(value.to_vec()),
                    b"size" => pax.size = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
                    _ => {}
                }
            }
            data = &data[len..];
        }
        pax
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A real archive made by the local GNU tar, read as the stream would be.
    #[test]
    fn reads_gnu_tar_archives() {
        let dir = tempfile::tempdir().unwrap();
        let long = "d".repeat(120);
        std::fs::create_dir(dir.path().join(&long)).unwrap();
        let files = [
            (dir.path().join("a"), vec![1u8; 3]),
            (dir.path().join(&long).join("b with space"), vec![2u8; 1000]),
            (dir.path().join("grew"), vec![3u8; 10]),
            (dir.path().join("shrank"), vec![4u8; 10]),
        ];
        for (path, bytes) in &files {
            std::fs::write(path, bytes).unwrap();
        }
        let missing = dir.path().join("missing");
        let mut names = Vec::new();
        let mut wanted: Vec<(&Path, usize)> = files.iter().map(|(p, b)| (p.as_path(), b.len())).collect();
        wanted[2].1 = 5;
        wanted[3].1 = 20;
        wanted.insert(1, (&missing, 4));
        for (path, _) in &wanted {
            names.extend_from_slice(path.as_os_str().as_bytes());
            names.push(0);
        }
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{COMMAND} 2>/dev/null"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &names).unwrap();
        let out = child.wait_with_output().unwrap().stdout;
        let mut bufs: Vec<Vec<u8>> = wanted.iter().map(|(_, len)| vec![0; *len]).collect();
        let mut reads: Vec<(usize, FileRead<'_>)> = wanted
            .iter()
            .zip(bufs.iter_mut())
            .enumerate()
            .map(|(i, ((path, _), buf))| (i, FileRead { path, buf, listed: None, result: Ok(()) }))
            .collect();
        let seen = parse(&mut out.as_slice(), &mut reads).unwrap();
        assert_eq!(seen, [true, false, true, true, true]);
        assert!(reads[0].1.result.is_ok() && reads[2].1.result.is_ok());
        assert!(matches!(reads[3].1.result, Err(SftpError::Longer)));
        assert!(matches!(reads[4].1.result, Err(SftpError::Short { end: 10 })));
        drop(reads);
        assert_eq!(bufs[0], files[0].1);
        assert_eq!(bufs[2], files[1].1);
    }

    #[test]
    fn what_is_not_tar_is_said_so() {
        for junk in [&b""[..], &[0u8; 1024][..], &[7u8; 600][..], b"\0\0\0\x05\x02\0\0\0\x03"] {
            assert!(matches!(parse(&mut &junk[..], &mut []), Err(Parse::NotTar)), "{junk:?}");
        }
    }

    #[test]
    fn numbers_octal_and_base_256() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]), Some(256));
        assert_eq!(number(b"zz"), None);
    }

    /// A host that runs the command, then says nothing: every wait runs out.
    struct Silent(std::sync::Arc<AtomicBool>);

    impl Read for Silent {
        fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }

    impl super::super::ssh::RemoteCommand for Silent {
        fn send_all_and_close(&mut self, _input: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn exit_status(self: Box<Self>) -> std::io::Result<Option<i32>> {
            unreachable!("a command that timed out is not waited for")
        }
        fn cut(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    impl Remote for Silent {
        fn exec(
            &mut self,
            _command: &str,
            _wait: Duration,
        ) -> Result<Box<dyn super::super::ssh::RemoteCommand>, String> {
            Ok(Box::new(Silent(self.0.clone())))
        }
    }

    #[test]
    fn a_silent_tar_is_a_timeout_and_is_cut_not_a_refusal() {
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let mut buf = [0u8; 4];
        let mut reads = [(0, FileRead { path: Path::new("/a"), buf: &mut buf, listed: None, result: Ok(()) })];
        let tar = TarUse::default();
        let result = read_files(&mut Silent(cut.clone()), Duration::from_secs(1), &tar, "host", &mut reads);
        assert!(matches!(result, Err(SftpError::TimedOut)), "{result:?}");
        assert!(cut.load(Ordering::Relaxed), "the command was not cut");
        assert!(tar.allowed(), "a silent host is not one that refuses tar");
    }
}
