//! The CRIU image framing: one or two magic words, then entries, each a 32-bit
//! little-endian length and that many bytes of one protobuf message.

use prost::Message;

use super::error::FrameError;

/// First word of most images; the second word then names the image type.
const IMG_COMMON: u32 = 0x5456_4319;
/// First word of service images (stats and the like); a type word follows too.
const IMG_SERVICE: u32 = 0x5510_5940;

/// No entry lazyfs reads comes near this; a larger length means a damaged image.
pub const MAX_ENTRY_LEN: u32 = 16 << 20;

/// The type word of one kind of image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Magic {
    pub name: &'static str,
    pub value: u32,
}

pub const INVENTORY: Magic = Magic { name: "INVENTORY", value: 0x5831_3116 };
pub const PSTREE: Magic = Magic { name: "PSTREE", value: 0x5027_3030 };
pub const CORE: Magic = Magic { name: "CORE", value: 0x5505_3847 };
pub const IDS: Magic = Magic { name: "IDS", value: 0x5443_2030 };
pub const FILES: Magic = Magic { name: "FILES", value: 0x5630_3138 };
pub const REG_FILES: Magic = Magic { name: "REG_FILES", value: 0x5036_3636 };
pub const FDINFO: Magic = Magic { name: "FDINFO", value: 0x5621_3732 };
pub const MM: Magic = Magic { name: "MM", value: 0x5749_2820 };
pub const FS: Magic = Magic { name: "FS", value: 0x5140_3912 };
pub const REMAP_FPATH: Magic = Magic { name: "REMAP_FPATH", value: 0x5913_3954 };
pub const MNTS: Magic = Magic { name: "MNTS", value: 0x5556_3928 };

/// Checks the magic word(s) and decodes every entry of an image held in memory.
pub fn decode_entries<M: Message + Default>(bytes: &[u8], magic: Magic) -> Result<Vec<M>, FrameError> {
    let mut offset = check_magic(bytes, magic)?;
    let mut entries = Vec::new();
    while offset < bytes.len() {
        let Some(word) = read_u32(bytes, offset) else {
            return Err(FrameError::TruncatedLength { offset, have: bytes.len() - offset });
        };
        let body = offset + 4;
        if word > MAX_ENTRY_LEN {
            return Err(FrameError::EntryTooLarge { offset, len: word });
        }
        let len = word as usize;
        let remaining = bytes.len() - body;
        if len > remaining {
            return Err(FrameError::EntryPastEnd { offset, len, remaining });
        }
        let entry = M::decode(&bytes[body..body + len]).map_err(|source| FrameError::Decode {
            index: entries.len(),
            offset,
            source,
        })?;
        entries.push(entry);
        offset = body + len;
    }
    Ok(entries)
}

/// Returns the offset of the first entry.
fn check_magic(bytes: &[u8], magic: Magic) -> Result<usize, FrameError> {
    let first = read_u32(bytes, 0).ok_or(FrameError::NoMagic { len: bytes.len() })?;
    let (found, offset) = if first == IMG_COMMON || first == IMG_SERVICE {
        (read_u32(bytes, 4).ok_or(FrameError::NoMagic { len: bytes.len() })?, 8)
    } else {
        (first, 4)
    };
    if found == magic.value { Ok(offset) } else { Err(FrameError::WrongMagic { expected: magic, found }) }
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let word = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

/// Encodes entries with the two-word header CRIU writes (tests build images with it).
pub fn encode_entries<M: Message>(magic: Magic, entries: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    if magic != INVENTORY {
        out.extend_from_slice(&IMG_COMMON.to_le_bytes());
    }
    out.extend_from_slice(&magic.value.to_le_bytes());
    for entry in entries {
        let len = u32::try_from(entry.encoded_len()).expect("entry under 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        entry.encode(&mut out).expect("Vec grows as needed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::proto::PstreeEntry;

    fn pstree(pid: u32) -> PstreeEntry {
        PstreeEntry { pid, ppid: 0, pgid: pid, sid: pid, threads: vec![pid] }
    }

    #[test]
    fn round_trip() {
        let entries = vec![pstree(1), pstree(42)];
        let bytes = encode_entries(PSTREE, &entries);
        assert_eq!(decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap(), entries);
    }

    #[test]
    fn single_word_magic() {
        let mut bytes = PSTREE.value.to_le_bytes().to_vec();
        bytes.extend_from_slice(&encode_entries(PSTREE, &[pstree(7)])[8..]);
        assert_eq!(decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap(), vec![pstree(7)]);
    }

    #[test]
    fn magic_only_has_no_entries() {
        let bytes = encode_entries::<PstreeEntry>(PSTREE, &[]);
        assert!(decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap().is_empty());
    }

    #[test]
    fn empty_and_short() {
        for bytes in [&[][..], &[0x19, 0x43], &IMG_COMMON.to_le_bytes()] {
            let err = decode_entries::<PstreeEntry>(bytes, PSTREE).unwrap_err();
            assert!(matches!(err, FrameError::NoMagic { .. }), "{err}");
        }
    }

    #[test]
    fn wrong_magic() {
        let bytes = encode_entries(FILES, &[pstree(1)]);
        let err = decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap_err();
        assert_eq!(err.to_string(), "wrong magic 0x56303138, expected PSTREE (0x50273030)");
    }

    #[test]
    fn truncated_entry() {
        let bytes = encode_entries(PSTREE, &[pstree(1)]);
        for cut in 9..bytes.len() {
            let err = decode_entries::<PstreeEntry>(&bytes[..cut], PSTREE).unwrap_err();
            assert!(
                matches!(err, FrameError::TruncatedLength { .. } | FrameError::EntryPastEnd { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn absurd_length() {
        let mut bytes = encode_entries::<PstreeEntry>(PSTREE, &[]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap_err();
        assert!(matches!(err, FrameError::EntryTooLarge { .. }), "{err}");
    }

    #[test]
    fn garbage_entry() {
        let mut bytes = encode_entries::<PstreeEntry>(PSTREE, &[]);
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = decode_entries::<PstreeEntry>(&bytes, PSTREE).unwrap_err();
        assert!(matches!(err, FrameError::Decode { index: 0, offset: 8, .. }), "{err}");
    }
}
