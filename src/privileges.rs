//! What a change of a file takes away from its privileges, as Linux does:
//! set-user-ID, set-group-ID (only with group execute: without it the bit
//! marks mandatory locking) and file capabilities (`security.capability`).
//!
//! lazyfs tells the kernel it clears them itself (`FUSE_HANDLE_KILLPRIV_V2`),
//! so the kernel stops asking for `security.capability` before every write
//! (a round trip to the daemon each). The rules are FUSE's: capabilities go
//! on every write, truncate and chown; set-ID bits on a chown, and on a write
//! or a truncate by a caller without `CAP_FSETID` (the kernel says so in the
//! write's flags; see `fuse.rs` for truncate).

use std::ffi::OsStr;

/// The extended attribute holding a file's capabilities.
pub const CAPABILITY: &str = "security.capability";

/// What a change takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// The permission bits without the set-ID bits, if they change.
    pub perm: Option<u32>,
    /// Whether `security.capability` goes.
    pub capability: bool,
}

/// What a change of a file whose permission bits are `perm` drops;
/// `set_ids` says whether the set-ID bits go too. `None`: nothing.
pub fn dropped(perm: u32, has_capability: bool, set_ids: bool) -> Option<Dropped> {
    let mut kept = perm;
    if set_ids {
        kept &= !libc::S_ISUID;
        if perm & libc::S_IXGRP != 0 {
            kept &= !libc::S_ISGID;
        }
    }
    let dropped = Dropped { perm: (kept != perm).then_some(kept), capability: has_capability };
    (dropped.perm.is_some() || dropped.capability).then_some(dropped)
}

/// Whether a file with these bits and attributes has privileges a write
/// could have to drop (so writes must come through lazyfs, not passthrough).
pub fn privileged<'a>(perm: u32, mut xattrs: impl Iterator<Item = &'a OsStr>) -> bool {
    perm & libc::S_ISUID != 0
        || perm & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP
        || xattrs.any(|name| name == CAPABILITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ids_go_only_when_asked_and_setgid_only_with_group_execute() {
        assert_eq!(dropped(0o6755, false, true), Some(Dropped { perm: Some(0o755), capability: false }));
        assert_eq!(dropped(0o6745, false, true), Some(Dropped { perm: Some(0o2745), capability: false }));
        assert_eq!(dropped(0o6755, false, false), None);
        assert_eq!(dropped(0o6755, true, false), Some(Dropped { perm: None, capability: true }));
        assert_eq!(dropped(0o755, false, true), None);
    }

    #[test]
    fn privileged_files() {
        let none = std::iter::empty();
        assert!(privileged(0o4755, none.clone()));
        assert!(privileged(0o2750, none.clone()));
        assert!(!privileged(0o2740, none.clone()));
        assert!(!privileged(0o755, none));
        assert!(privileged(0o755, [OsStr::new("user.x"), OsStr::new(CAPABILITY)].into_iter()));
    }
}
