//! What each subcommand prints, kept apart from argument parsing and exit codes.

pub mod export;
pub mod ls;
pub mod push;
pub mod verify;
