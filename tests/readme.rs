//! What the README promises a new user, checked against the README itself:
//! `scripts/demo` does the main job end to end; the "Using it" commands,
//! taken word for word from README.md, restore a real process over SSH in
//! the demo's world (`scripts/demo --commands FILE`); the list of tests names
//! every test file.

mod common;

use std::path::Path;
use std::process::Output;

use common::mount::TestEnv;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The text of README's section `heading`, up to the next `## ` heading.
fn section(heading: &str) -> String {
    let readme = readme();
    let start = readme.find(&format!("\n## {heading}\n")).unwrap_or_else(|| panic!("README has no ## {heading}"));
    let rest = &readme[start + heading.len() + 5..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// The first ```sh block of README's section `heading`.
fn first_sh_block(heading: &str) -> String {
    let section = section(heading);
    let block = section.split("```sh\n").nth(1).unwrap_or_else(|| panic!("no ```sh block under ## {heading}"));
    block.split("```").next().unwrap().to_string()
}

/// `scripts/demo ARGS` with this build's lazyfs and a small model file (16 MiB: the bytes move the same).
fn demo(env: &TestEnv, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo");
    let mut command = env.lazyfs_with(script.to_str().unwrap());
    command.args(args).env("LAZYFS", env!("CARGO_BIN_EXE_lazyfs")).env("DEMO_MIB", "16");
    command.output().unwrap()
}

fn check_the_process_outlives_the_old_host(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // Before the dump, on the old host; after the restore, on the lazy mount; after the old host went away.
    assert!(stdout.contains("question 1: the process answered") && stdout.contains("question 3: the"), "{stdout}");
    let after = stdout.split("the old host goes away").nth(1).expect("the old host went away");
    assert!(after.contains("question 13: the process answered") && after.contains(": right"), "{stdout}");
    assert!(after.contains("every file is here: the old host is no longer needed"), "{stdout}");
    stdout
}

#[test]
fn the_demo_restores_a_real_process_over_ssh_that_outlives_the_old_host() {
    let env = TestEnv::new();
    let out = demo(&env, &[]);
    let stdout = check_the_process_outlives_the_old_host(&out);
    for step in [
        "$ criu dump -t",
        "$ lazyfs mount --prefetch /srv/app/data /srv/ckpt root@old-host --subtree",
        "$ criu restore -D /srv/ckpt -d",
    ] {
        assert!(stdout.contains(step), "{step}: {stdout}");
    }
    assert!(stdout.contains("wait: exit 0"), "{stdout}");
}

/// README's "Using it" block, word for word, on the demo's new host: the
/// process it restores answers right, and goes on once the old host is gone.
#[test]
fn the_using_it_commands_work_word_for_word() {
    let env = TestEnv::new();
    let commands = first_sh_block("Using it");
    assert!(commands.contains("criu restore"), "{commands}");
    let file = env.path("using-it.sh");
    std::fs::write(&file, &commands).unwrap();
    let out = demo(&env, &["--commands", file.to_str().unwrap()]);
    check_the_process_outlives_the_old_host(&out);
    // Each command ran, as written (bash -x shows it).
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in commands.lines().map(|l| l.split(" #").next().unwrap().trim()).filter(|l| !l.is_empty()) {
        assert!(stderr.contains(&format!("+ {line}")), "{line:?} did not run: {stderr}");
    }
}

/// README's "Tests" section names every file of tests/.
#[test]
fn the_readme_lists_every_test_file() {
    let tests = section("Tests");
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".rs") {
            assert!(tests.contains(&format!("`tests/{name}`")), "README's Tests section does not name tests/{name}");
        }
    }
}
