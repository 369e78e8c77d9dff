//! The CLI edge: parses arguments, runs a command, and turns its error into a
//! one-line message and an exit code.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lazyfs::cli::{Cli, Command, LsArgs, exit};
use lazyfs::commands::ls;
use lazyfs::images::{Checkpoint, ImageError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // A reader that stopped early (`lazyfs ls | head`) is not a failure.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("lazyfs: {message}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Ls(args) => run_ls(&args),
        Command::Mount(_) => not_built("mount"),
        Command::Status(_) => not_built("status"),
        Command::Wait(_) => not_built("wait"),
        Command::Umount(_) => not_built("umount"),
        Command::Manifest(_) => not_built("manifest"),
        Command::Verify(_) => not_built("verify"),
    }
}

fn run_ls(args: &LsArgs) -> anyhow::Result<u8> {
    let checkpoint = Checkpoint::load(&args.imgdir)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &ls::to_json(&checkpoint))?;
        writeln!(out)?;
    } else {
        ls::write_table(&checkpoint, &mut out).context("writing the listing")?;
    }
    Ok(exit::SUCCESS)
}

fn not_built(command: &str) -> anyhow::Result<u8> {
    eprintln!("lazyfs {command}: not built yet in this version");
    Ok(exit::RUNTIME)
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Bad input is 2; everything else that stops a command is a runtime failure.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<ImageError>()) {
        exit::BAD_INPUT
    } else {
        exit::RUNTIME
    }
}
