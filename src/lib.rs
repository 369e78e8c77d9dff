//! lazyfs: serve a CRIU checkpoint's files on the host it restarts on,
//! fetching their contents lazily from the host it ran on.

pub mod cli;
pub mod commands;
pub mod control;
pub mod deferred;
pub mod detached;
pub mod dir_handles;
pub mod failover;
pub mod fetch;
pub mod fs;
pub mod fuse;
pub mod identity;
pub mod images;
pub mod log_sink;
pub mod manifest;
pub mod mount;
pub mod namespace;
pub mod privileges;
pub mod push;
pub mod recording;
pub mod s3;
pub mod source;
pub mod status;
pub mod store;
pub mod tree;
pub mod ui;
