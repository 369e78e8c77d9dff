//! lazyfs: serve a CRIU checkpoint's files on the host it restarts on,
//! fetching their contents lazily from the host it ran on.

pub mod cli;
pub mod commands;
pub mod images;
pub mod source;
