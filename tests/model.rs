//! A model-based test of the core: random reads, writes, truncates, source
//! changes (touched: same bytes, new mtime, so a transfer under way starts
//! over; replaced: new bytes, with a manifest), remounts and kills, against an
//! in-memory model of each file. Every byte read must be the model's; the only
//! other answer allowed is EIO, and only for a file whose source changed.

mod common;

use common::harness::Core;
use common::mount::content;
use proptest::prelude::*;

const CHUNK: u64 = 16 << 10;
const PATHS: [&str; 3] = ["/m/empty-or-small", "/m/chunks", "/m/many"];

#[derive(Debug, Clone)]
enum Op {
    Read {
        file: usize,
        offset: u64,
        len: u32,
    },
    Write {
        file: usize,
        offset: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    /// Same bytes, a new mtime.
    Touch {
        file: usize,
    },
    /// New bytes of the same size (only with a manifest).
    Replace {
        file: usize,
    },
    Remount {
        jobs: usize,
    },
    Kill {
        jobs: usize,
    },
}

fn op(sizes: [u64; 3]) -> impl Strategy<Value = Op> {
    let file = 0..3usize;
    let span = move |f: usize| sizes[f] + 2 * CHUNK;
    prop_oneof![
        4 => (file.clone(), any::<u64>(), 1..3 * CHUNK as u32)
            .prop_map(move |(file, o, len)| Op::Read { file, offset: o % span(file), len }),
        2 => (file.clone(), any::<u64>(), 1..2 * CHUNK as usize, any::<u8>())
            .prop_map(move |(file, o, len, byte)| Op::Write { file, offset: o % span(file), len, byte }),
        1 => (file.clone(), any::<u64>()).prop_map(move |(file, s)| Op::Truncate { file, size: s % span(file) }),
        1 => file.clone().prop_map(|file| Op::Touch { file }),
        1 => file.prop_map(|file| Op::Replace { file }),
        1 => (0..3usize).prop_map(|jobs| Op::Remount { jobs }),
        1 => (0..3usize).prop_map(|jobs| Op::Kill { jobs }),
    ]
}

fn case() -> impl Strategy<Value = ([u64; 3], bool, Vec<Op>)> {
    (0..200u64, 1..5 * CHUNK, 5 * CHUNK..40 * CHUNK, any::<bool>()).prop_flat_map(|(a, b, c, manifest)| {
        let sizes = [a, b, c];
        (Just(sizes), Just(manifest), proptest::collection::vec(op(sizes), 1..30))
    })
}

/// What reads of a file must give.
struct Model {
    bytes: Vec<u8>,
    /// Changed locally: the cache is the file.
    local: bool,
    /// The source no longer has these bytes: a read may answer EIO.
    source_changed: bool,
}

fn run(sizes: [u64; 3], manifest: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let files: Vec<(&str, Vec<u8>, bool)> =
        PATHS.iter().zip(sizes).map(|(p, size)| (*p, content(p, size as usize), true)).collect();
    let mut core = Core::new(&files);
    if manifest {
        core.write_manifest();
    }
    // A slow source: prefetches stay in flight while the operations go on.
    core.plan.on_read(|_, _, _| {
        std::thread::sleep(std::time::Duration::from_millis(2));
        common::harness::Fault::Pass
    });
    let mut model: Vec<Model> =
        files.iter().map(|(_, bytes, _)| Model { bytes: bytes.clone(), local: false, source_changed: false }).collect();
    core.mount(0).unwrap();
    for op in ops {
        match *op {
            Op::Read { file, offset, len } => {
                let m = &model[file];
                let end = (offset + u64::from(len)).min(m.bytes.len() as u64);
                let want = m.bytes.get(offset as usize..end as usize).unwrap_or_default();
                match core.read(PATHS[file], offset, len) {
                    Ok(got) => prop_assert!(got == want, "{op:?}: {} bytes differ", got.len()),
                    Err(errno) => {
                        prop_assert!(m.source_changed && !m.local && errno == libc::EIO, "{op:?}: errno {errno}")
                    }
                }
            }
            Op::Write { file, offset, len, byte } => match core.write(PATHS[file], offset, &vec![byte; len]) {
                Ok(n) => {
                    prop_assert_eq!(n as usize, len);
                    let m = &mut model[file];
                    let end = offset as usize + len;
                    if m.bytes.len() < end {
                        m.bytes.resize(end, 0);
                    }
                    m.bytes[offset as usize..end].fill(byte);
                    m.local = true;
                }
                Err(errno) => prop_assert!(
                    model[file].source_changed && !model[file].local && errno == libc::EIO,
                    "{op:?}: errno {errno}"
                ),
            },
            Op::Truncate { file, size } => match core.truncate(PATHS[file], size) {
                Ok(len) => {
                    prop_assert_eq!(len, size);
                    model[file].bytes.resize(size as usize, 0);
                    model[file].local = true;
                }
                Err(errno) => prop_assert!(
                    model[file].source_changed && !model[file].local && errno == libc::EIO,
                    "{op:?}: errno {errno}"
                ),
            },
            Op::Touch { file } => {
                let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60 * (1 + file as u64));
                let at = core.source.join(PATHS[file].trim_start_matches('/'));
                std::fs::File::options().write(true).open(at).unwrap().set_modified(later).unwrap();
                // Touched too often while fetched, a file fails ("changed again").
                model[file].source_changed |= !manifest;
            }
            Op::Replace { file } if manifest => {
                let at = core.source.join(PATHS[file].trim_start_matches('/'));
                let len = std::fs::metadata(&at).unwrap().len() as usize;
                std::fs::write(at, content(&format!("{}-new", PATHS[file]), len)).unwrap();
                model[file].source_changed = true;
            }
            Op::Replace { .. } => {}
            Op::Remount { jobs } => {
                core.unmount();
                core.mount(jobs).unwrap();
            }
            Op::Kill { jobs } => {
                core.kill();
                core.mount(jobs).unwrap();
            }
        }
    }
    // Last, with prefetch: every file whole.
    core.unmount();
    core.mount(2).unwrap();
    for (file, m) in model.iter().enumerate() {
        match core.read(PATHS[file], 0, m.bytes.len() as u32 + 1) {
            Ok(got) => prop_assert!(got == m.bytes, "{}: the whole file differs", PATHS[file]),
            Err(errno) => prop_assert!(m.source_changed && !m.local, "{}: errno {errno}", PATHS[file]),
        }
        prop_assert_eq!(core.len(PATHS[file]), m.bytes.len() as u64);
    }
    core.unmount();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_byte_read_is_the_models((sizes, manifest, ops) in case()) {
        run(sizes, manifest, &ops)?;
    }
}
