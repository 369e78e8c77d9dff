//! Property tests: no byte string, however damaged, makes the image reader
//! panic, and whatever it refuses it refuses with an error naming the image.

mod common;

use std::path::Path;

use lazyfs::images::framing::{self, Magic};
use lazyfs::images::proto::{FdinfoEntry, FileEntry, FownEntry, MmEntry, PstreeEntry, RegFileEntry};
use lazyfs::images::{Checkpoint, names};
use proptest::prelude::*;

const MAGICS: [Magic; 6] =
    [framing::FILES, framing::REG_FILES, framing::FDINFO, framing::MM, framing::PSTREE, framing::INVENTORY];

fn decode_all_kinds(bytes: &[u8]) {
    for magic in MAGICS {
        let _ = framing::decode_entries::<FileEntry>(bytes, magic);
        let _ = framing::decode_entries::<RegFileEntry>(bytes, magic);
        let _ = framing::decode_entries::<FdinfoEntry>(bytes, magic);
        let _ = framing::decode_entries::<MmEntry>(bytes, magic);
        let _ = framing::decode_entries::<PstreeEntry>(bytes, magic);
    }
}

/// A damage to an image: flip bytes, cut it, splice garbage, or rewrite a length word.
#[derive(Debug, Clone)]
enum Damage {
    Flip(Vec<(usize, u8)>),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Length(usize, u32),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        prop::collection::vec((any::<usize>(), 1u8..=255), 1..8).prop_map(Damage::Flip),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, b)| Damage::Insert(at, b)),
        (any::<usize>(), any::<u32>()).prop_map(|(at, len)| Damage::Length(at, len)),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    if bytes.is_empty() {
        return;
    }
    match damage {
        Damage::Flip(flips) => {
            for (at, mask) in flips {
                let i = at % bytes.len();
                bytes[i] ^= mask;
            }
        }
        Damage::Truncate(at) => bytes.truncate(at % bytes.len()),
        Damage::Insert(at, garbage) => {
            let i = at % bytes.len();
            bytes.splice(i..i, garbage.iter().copied());
        }
        Damage::Length(at, len) => {
            let i = at % bytes.len();
            let end = (i + 4).min(bytes.len());
            bytes[i..end].copy_from_slice(&len.to_le_bytes()[..end - i]);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn fixture_images() -> Vec<std::path::PathBuf> {
    ["real/single/images", "real/d3-fork/images", "synthetic/legacy", "synthetic/edge"]
        .iter()
        .map(|rel| common::fixtures().join(rel))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all_kinds(&bytes);
    }

    #[test]
    fn arbitrary_entries_after_a_good_magic_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        for magic in MAGICS {
            let mut bytes = framing::encode_entries::<PstreeEntry>(magic, &[]);
            bytes.extend_from_slice(&body);
            decode_all_kinds(&bytes);
        }
    }

    #[test]
    fn names_never_panic_and_accepted_ones_are_canonical(name in prop::collection::vec(any::<u8>(), 0..300)) {
        if names::check_absolute(&name).is_ok() {
            prop_assert!(name.starts_with(b"/"));
            prop_assert!(!name.contains(&0));
            let components: Vec<&[u8]> = name[1..].split(|&b| b == b'/').collect();
            if name != b"/" {
                for c in components {
                    prop_assert!(!c.is_empty() && c != b"." && c != b"..");
                }
            }
        }
    }

    #[test]
    fn entries_round_trip(entries in prop::collection::vec(
        (any::<u32>(), any::<u32>(), prop::collection::vec(any::<u8>(), 0..64), prop::option::of(any::<u64>())), 0..16)
    ) {
        let regs: Vec<RegFileEntry> = entries.into_iter().map(|(id, flags, name, size)| RegFileEntry {
            id, flags, name, size, fown: FownEntry::default(), ..Default::default()
        }).collect();
        let bytes = framing::encode_entries(framing::REG_FILES, &regs);
        prop_assert_eq!(framing::decode_entries::<RegFileEntry>(&bytes, framing::REG_FILES).unwrap(), regs);
    }
}

proptest! {
    // Each case copies a dump to a temporary directory: fewer, costlier cases.
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn a_damaged_dump_loads_or_names_the_damaged_image(
        which_dir in any::<prop::sample::Index>(),
        which_file in any::<prop::sample::Index>(),
        damage in damage(),
    ) {
        let dirs = fixture_images();
        let source = which_dir.get(&dirs);
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(source, tmp.path());
        let mut images: Vec<_> = std::fs::read_dir(tmp.path()).unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "img"))
            .collect();
        images.sort();
        let victim = which_file.get(&images).clone();
        let mut bytes = std::fs::read(&victim).unwrap();
        apply(&mut bytes, &damage);
        std::fs::write(&victim, &bytes).unwrap();

        if let Err(err) = Checkpoint::load(tmp.path()) {
            let message = err.to_string();
            prop_assert!(!message.contains('\n'), "{}", message);
            prop_assert!(message.starts_with(&tmp.path().display().to_string()), "{}", message);
        }
    }
}
