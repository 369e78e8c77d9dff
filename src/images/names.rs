//! Names in images are untrusted data. A name that could escape the mount or
//! the cache (relative, `..`, `.`, empty components, NUL) is refused with a
//! reason; every other byte string is a legal Linux name and is kept as it is.

use std::fmt;

/// Linux's NAME_MAX: no component of a real path is longer.
const NAME_MAX: usize = 255;
/// Linux's PATH_MAX, terminating NUL included.
const PATH_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    Relative,
    Nul,
    DotDot,
    Dot,
    EmptyComponent,
    ComponentTooLong(usize),
    TooLong(usize),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "the name is empty"),
            NameError::Relative => write!(f, "the name is relative (does not start with /)"),
            NameError::Nul => write!(f, "the name holds a NUL byte"),
            NameError::DotDot => write!(f, "the name has a `..` component"),
            NameError::Dot => write!(f, "the name has a `.` component"),
            NameError::EmptyComponent => {
                write!(f, "the name has an empty component (`//` or a trailing /)")
            }
            NameError::ComponentTooLong(n) => {
                write!(f, "a component of the name is {n} bytes, more than {NAME_MAX}")
            }
            NameError::TooLong(n) => write!(f, "the name is {n} bytes, more than {}", PATH_MAX - 1),
        }
    }
}

/// Checks that `name` is a canonical absolute path; `/` itself is one.
pub fn check_absolute(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    if name[0] != b'/' {
        return Err(NameError::Relative);
    }
    if name.len() >= PATH_MAX {
        return Err(NameError::TooLong(name.len()));
    }
    if name == b"/" {
        return Ok(());
    }
    for component in name[1..].split(|&b| b == b'/') {
        match component {
            b"" => return Err(NameError::EmptyComponent),
            b"." => return Err(NameError::Dot),
            b".." => return Err(NameError::DotDot),
            c if c.len() > NAME_MAX => return Err(NameError::ComponentTooLong(c.len())),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_names() {
        for name in [
            &b"/"[..],
            b"/a",
            b"/srv/app/db",
            b"/dir with space/d e.txt",
            b"/q'uo\"te/$(touch x);`id`",
            b"/new\nline",
            b"/..hidden/...",
            b"/a.b/.c",
            b"/\xff\xfe not utf-8",
        ] {
            assert_eq!(check_absolute(name), Ok(()), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn refused_names() {
        let cases: [(&[u8], NameError); 10] = [
            (b"", NameError::Empty),
            (b"a/b", NameError::Relative),
            (b"./a", NameError::Relative),
            (b"/a\0b", NameError::Nul),
            (b"/a/../b", NameError::DotDot),
            (b"/..", NameError::DotDot),
            (b"/a/./b", NameError::Dot),
            (b"/a//b", NameError::EmptyComponent),
            (b"/a/", NameError::EmptyComponent),
            (b"//", NameError::EmptyComponent),
        ];
        for (name, want) in cases {
            assert_eq!(check_absolute(name), Err(want), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn lengths() {
        let long_component = format!("/{}", "x".repeat(256));
        assert_eq!(check_absolute(long_component.as_bytes()), Err(NameError::ComponentTooLong(256)));
        let long_path = "/abc".repeat(1024);
        assert_eq!(check_absolute(long_path.as_bytes()), Err(NameError::TooLong(4096)));
    }
}
