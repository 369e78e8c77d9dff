//! Real applications moved to a "new host" with real CRIU 4.2 and a lazy
//! mount of their whole directory (`lazyfs mount --subtree DIR`), each
//! restored by stock `criu restore -d` and then asked to use files it did not
//! have open at dump time: a static web server's pages, PostgreSQL's relation
//! files, a Python application's plugins; and an open SQLite connection that
//! writes again (its database keeps the old host's inode number, from the
//! manifest made there).
//!
//! Each test dumps its application once, moves the directory to the tests'
//! sshd (tests/common/apps.rs), and restores it twice: on a lazy mount (status
//! and `wait` must say the old host is needed until `lazyfs prefetch` brought
//! the rest) and on a `--prefetch` mount (after `wait`, the old host is
//! stopped and every file is still there). The applications run under
//! tests/criu/reaper.py (a reaping subreaper) near the top of a raised
//! pid_max; every test ends them by their pids, unmounts and stops its sshd,
//! however it ends. Everything talks to 127.0.0.1 only.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::apps::{
    Channel, Dumped, Fetch, OldHost, assert_all_here, assert_still_needs_the_old_host, free_port, http_get, prefetch,
    read_untouched, snapshot, summary, url_quote,
};
use common::criu::{
    PATIENCE, PYTHON, Reaper, Tree, build_criu, criu_dir, descendants, dump, log_tail, one_at_a_time, start_pids_high,
};
use common::mount::{TestEnv, content};

/// A web site of a few hundred files: nested directories, binary assets (one
/// of several MiB), names with spaces and shell characters, an empty
/// directory, a symlink. Returns the regular files' paths, relative.
fn write_site(site: &Path) -> Vec<String> {
    let mut pages = vec!["index.html".to_string(), "deep/a/b/c/d/e/f/leaf.txt".into()];
    for chapter in 1..=8 {
        for page in 1..=30 {
            pages.push(format!("docs/ch{chapter}/page-{page}.html"));
        }
    }
    for month in 1..=12 {
        pages.push(format!("archive/2019/{month:02}/post.html"));
    }
    pages.extend(["names/with space.html", "names/quote's $HOME; ok.html", "names/ünïcödé.html"].map(String::from));
    for image in 1..=20 {
        pages.push(format!("assets/img-{image}.bin"));
    }
    pages.push("assets/video.bin".into());
    for (i, page) in pages.iter().enumerate() {
        let path = site.join(page);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let len = match page.as_str() {
            "assets/video.bin" => 3 << 20,
            p if p.starts_with("assets/") => 1000 + i * 7919 % 300_000,
            _ => 200 + i * 4099 % 20_000,
        };
        std::fs::write(path, content(page, len)).unwrap();
    }
    std::fs::create_dir(site.join("empty")).unwrap();
    std::os::unix::fs::symlink("docs/ch1/page-1.html", site.join("latest.html")).unwrap();
    pages
}

/// Every page of the site answers with the old host's bytes; a page that
/// does not exist is still 404; directory listings name every page.
fn check_site(port: u16, old_site: &Path, pages: &[String]) {
    check_pages(port, old_site, pages);
    let (code, body) = http_get(port, "/latest.html");
    assert_eq!((code, body), (200, read_untouched(&old_site.join("docs/ch1/page-1.html"))), "a symlink");
    for missing in ["/missing.html", "/docs/ch1/page-31.html", "/empty/nothing"] {
        assert_eq!(http_get(port, missing).0, 404, "GET {missing}");
    }
    for dir in ["docs/ch8/", "names/", "empty/", "deep/a/b/c/d/e/f/"] {
        let (code, body) = http_get(port, &format!("/{dir}"));
        assert_eq!(code, 200, "GET /{dir}");
        let listing = String::from_utf8_lossy(&body);
        for page in pages.iter().filter_map(|p| p.strip_prefix(dir)).filter(|p| !p.contains('/')) {
            assert!(listing.contains(&format!("href=\"{}\"", url_quote(page))), "GET /{dir} does not list {page}");
        }
    }
}

/// `python3 -m http.server --directory SITE`, none of whose pages is open at
/// dump time (it opens each page per request): after the restore it serves
/// every page of SITE.
#[test]
fn a_restored_static_web_server_serves_every_page_of_its_directory() {
    let _one = one_at_a_time();
    let criu = build_criu();
    let env = TestEnv::new();
    let (site, img) = (env.path("site"), env.path("img"));
    let pages = write_site(&site);
    let port = free_port();

    start_pids_high();
    let port_arg = port.to_string();
    let args = ["/usr/bin/setsid", PYTHON, "-m", "http.server", &port_arg, "--bind", "127.0.0.1", "--directory"];
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.push(site.as_os_str());
    let server = Reaper::start(&args);
    let pid = server.expect("pid");
    let _original = Tree { pids: vec![pid], script: "http.server" };
    // It answers; then nothing but its listening socket is left (each request
    // has its thread, which ends after the answer).
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server does not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(port, "/docs/ch1/page-1.html").0, 200);
    while std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count() > 1 {
        assert!(Instant::now() < deadline, "http.server's request thread does not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    dump(&criu, pid, &img, None, &[]);
    assert_eq!(server.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the server");
    drop(server);

    let mut old = OldHost::take(&env, &[&site]);
    let old_site = old.path_of(&site);
    let on_old_host = snapshot(&old_site);
    assert_eq!(on_old_host.len(), pages.len());
    let dumped = Dumped { criu, dir: site.clone(), imgdir: img, pids: vec![pid], script: "http.server", options: &[] };
    for fetch in [Fetch::Lazy, Fetch::Prefetch] {
        let restored = dumped.restore(&old, &env, fetch, &format!("{fetch:?}"));
        let mount = &restored.mount;
        if fetch == Fetch::Lazy {
            assert_still_needs_the_old_host(&env, mount, pages.len());
            // Lazy: a few pages read fetch about those pages.
            let few = &pages[10..15];
            check_pages(port, &old_site, few);
            let present = mount.status()["files_present"].as_u64().unwrap();
            assert!((few.len() as u64..few.len() as u64 * 2).contains(&present), "{present} files fetched");
            // Every page but the archive's, by clients at once: the archive
            // is still only on the old host.
            let (archive, rest): (Vec<String>, Vec<String>) =
                pages.iter().cloned().partition(|p| p.starts_with("archive/"));
            check_pages(port, &old_site, &rest);
            assert_still_needs_the_old_host(&env, mount, pages.len());
            let status = mount.status();
            assert_eq!(status["files_present"], rest.len(), "{}", summary(&status));
            prefetch(&env, mount);
            check_pages(port, &old_site, &archive);
        } else {
            // Pages asked for while the prefetch runs.
            check_site(port, &old_site, &pages);
        }
        assert_all_here(&env, mount);
        assert_eq!(mount.status()["files_total"], pages.len());
        // The old host can go: every page is here.
        old.sshd.stop();
        check_site(port, &old_site, &pages);
        // `lazyfs export` copies the whole site: the next start needs no lazyfs.
        let export = env.path(&format!("export-{fetch:?}"));
        let out = env.run(&["export", site.to_str().unwrap(), export.to_str().unwrap()]);
        assert!(out.status.success(), "lazyfs export: {}", String::from_utf8_lossy(&out.stderr));
        assert!(snapshot(&export) == on_old_host, "the export is not the old host's site");
        assert_eq!(std::fs::read_link(export.join("latest.html")).unwrap(), Path::new("docs/ch1/page-1.html"));
        assert!(export.join("empty").is_dir());
        old.sshd.restart();

        restored.end();
    }
    assert_eq!(snapshot(&old_site), on_old_host, "the old host's files are unchanged");
}

/// Each of `pages` answers with the old host's bytes; asked by 8 clients at
/// once, as a browser asks for a page's assets.
fn check_pages(port: u16, old_site: &Path, pages: &[String]) {
    std::thread::scope(|scope| {
        for client in pages.chunks(pages.len().div_ceil(8)) {
            scope.spawn(move || {
                for page in client {
                    let (code, body) = http_get(port, &format!("/{page}"));
                    assert_eq!(code, 200, "GET /{page}");
                    let expected = read_untouched(&old_site.join(page));
                    assert!(body == expected, "GET /{page}: not the old host's bytes");
                }
            });
        }
    });
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The tables the database holds: a small one, one of several MiB with an
/// index, and one whose rows live in its TOAST table (three more relation
/// files). Vacuumed and checkpointed, so a restarted server has no reason
/// to touch them.
const PG_LOAD: &str = "
create table small as select g as id, md5(g::text) as v from generate_series(1, 1000) g;
create table big as select g as id, repeat(md5(g::text), 3) as v from generate_series(1, 60000) g;
create index big_id on big (id);
create table docs as select g as id,
    (select string_agg(md5(g::text || '.' || i::text), '') from generate_series(1, 160) i) as v
    from generate_series(1, 200) g;
vacuum analyze;
checkpoint;
";

/// What each table holds, one line: rows and a digest of every value.
const PG_CONTENTS: &str = "
select string_agg(t || '=' || n || '/' || d, ' ' order by t) from (
    select 'small' as t, count(*) as n, md5(string_agg(v, ',' order by id)) as d from small
    union all select 'big', count(*), md5(string_agg(v, ',' order by id)) from big
    union all select 'docs', count(*), md5(string_agg(v, ',' order by id)) from docs) x;
";

/// A PostgreSQL 15 server (Debian's), its data directory 0700 `postgres`.
struct Postgres {
    data: PathBuf,
    port: u16,
    user: nix::unistd::User,
}

fn postgres_user() -> nix::unistd::User {
    nix::unistd::User::from_name("postgres").unwrap().expect("user postgres (scripts/setup installs postgresql-15)")
}

impl Postgres {
    /// `initdb` as `postgres`, then the settings CRIU needs: shared memory as
    /// mappings (it still makes a small SysV segment, hence the IPC
    /// namespace each server runs in), TCP on 127.0.0.1 only, no Unix socket;
    /// no autovacuum, so no worker has a table open when the server is dumped.
    fn init(data: &Path) -> Postgres {
        let pg = Postgres { data: data.to_path_buf(), port: free_port(), user: postgres_user() };
        std::fs::create_dir(data).unwrap();
        std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        pg.own(data);
        let out = as_postgres(&format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(data)
            .args(["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .current_dir("/")
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             shared_memory_type = mmap\ndynamic_shared_memory_type = mmap\nhuge_pages = off\nautovacuum = off\n",
            pg.port
        );
        let mut file = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        pg
    }

    /// Makes `path` the server's user's.
    fn own(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.user.uid.as_raw()), Some(self.user.gid.as_raw())).unwrap();
    }

    /// The server's command line: a session of its own (as CRIU wants the
    /// root of what it dumps), in an IPC namespace of its own, as `postgres`,
    /// its log appended to `log`.
    fn command(&self, log: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["setsid", "unshare", "--ipc", "--"].map(Into::into).into();
        args.extend(as_postgres_args().into_iter().map(Into::into));
        args.extend(["sh", "-c", "exec \"$0\" -D \"$1\" 2>>\"$2\""].map(Into::into));
        args.extend([format!("{PG_BIN}/postgres").into(), self.data.clone().into(), log.into()]);
        args
    }

    /// Runs SQL through psql (TCP, 127.0.0.1): its output, unaligned. A server
    /// stuck on a read is given up after PATIENCE (psql killed, exit 124).
    fn sql(&self, sql: &str) -> Result<String, String> {
        let mut psql = Command::new("timeout")
            .args(["--kill-after=5", &PATIENCE.as_secs().to_string(), &format!("{PG_BIN}/psql")])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // One transaction per statement (VACUUM refuses to run in one with others).
        std::io::Write::write_all(&mut psql.stdin.take().unwrap(), sql.as_bytes()).unwrap();
        let out = psql.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("psql exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Waits until the server answers, then until the backend that answered
    /// is gone (only the postmaster's own processes are left).
    fn wait_ready(&self, postmaster: i32, log: &Path) {
        let deadline = Instant::now() + PATIENCE;
        while let Err(e) = self.sql("select 1") {
            assert!(Instant::now() < deadline, "PostgreSQL does not answer: {e}\n{}", log_tail(log));
            std::thread::sleep(Duration::from_millis(100));
        }
        // A backend's command line names its client.
        let is_backend = |pid: &i32| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(9).any(|w| w == b"127.0.0.1")
        };
        while descendants(postmaster).iter().any(is_backend) {
            assert!(Instant::now() < deadline, "a PostgreSQL backend does not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// setpriv's arguments that run the rest as `postgres`.
fn as_postgres_args() -> [&'static str; 4] {
    ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
}

fn as_postgres(program: &str) -> Command {
    let [setpriv, args @ ..] = as_postgres_args();
    let mut command = Command::new(setpriv);
    command.args(args).arg("--").arg(program);
    command
}

/// Starts `args` under a reaper: the reaper and the process's pid.
fn start(args: &[OsString]) -> (Reaper, i32) {
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let reaper = Reaper::start(&args);
    let pid = reaper.expect("pid");
    (reaper, pid)
}

/// PostgreSQL from Debian, run as `postgres` in a data directory 0700
/// `postgres`, dumped by CRIU (unprivileged, as `postgres`) with none of its
/// tables open, restored as root: it reads every table (relation files,
/// an index, a TOAST table) from the lazy mount, inserts, checkpoints (writing
/// its WAL segment, 0600 `postgres`, and the table's file), makes a table (its
/// file is `postgres`'s) and keeps working once the old host is gone.
#[test]
fn a_restored_postgresql_reads_tables_it_had_not_opened_and_writes() {
    let _one = one_at_a_time();
    let criu = build_criu();
    let env = TestEnv::new();
    // postgres must reach its data directory below the test's.
    std::fs::set_permissions(env.path(""), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (data, img, run) = (env.path("pgdata"), env.path("img"), env.path("run"));
    let pg = Postgres::init(&data);
    // Where the servers write their logs.
    std::fs::create_dir(&run).unwrap();
    pg.own(&run);

    // A first server loads the tables and stops cleanly.
    let load_log = run.join("load.log");
    let (mut loader, pid) = start(&pg.command(&load_log));
    let loading = Tree { pids: vec![pid], script: "postgres" };
    pg.wait_ready(pid, &load_log);
    pg.sql(PG_LOAD).unwrap_or_else(|e| panic!("loading: {e}\n{}", log_tail(&load_log)));
    let contents = pg.sql(PG_CONTENTS).unwrap();
    let row_4242 = pg.sql("select v from big where id = 4242").unwrap();
    let tables = "array['small', 'big', 'big_id', 'docs', (select reltoastrelid::regclass::text from pg_class where relname = 'docs')]";
    let table_files = pg.sql(&format!("select pg_relation_filepath(t) from unnest({tables}) t")).unwrap();
    let table_files: Vec<PathBuf> = table_files.lines().map(|f| data.join(f)).collect();
    assert_eq!(table_files.len(), 5);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(loader.expect("exit"), 0, "fast shutdown: {}", log_tail(&load_log));
    assert!(loader.finish());
    drop(loading);

    // The server that is dumped: nothing of the tables read since it started.
    start_pids_high();
    let log = run.join("server.log");
    let (server, postmaster) = start(&pg.command(&log));
    let _original = Tree { pids: vec![postmaster], script: "postgres" };
    pg.wait_ready(postmaster, &log);
    let mut pids = vec![postmaster];
    pids.extend(descendants(postmaster));
    dump(&criu, postmaster, &img, Some("postgres"), &[]);
    assert_eq!(server.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the server");
    drop(server);
    let log_at_dump = std::fs::metadata(&log).unwrap().len();
    let recorded = recorded_paths(&env, &img);
    for file in &table_files {
        assert!(!recorded.contains(file), "{} was open at dump time", file.display());
    }

    let mut old = OldHost::take(&env, &[&data]);
    let files_on_old_host = snapshot(&old.path_of(&data)).len();
    let dumped = Dumped { criu, dir: data.clone(), imgdir: img, pids, script: "postgres", options: &[] };
    for fetch in [Fetch::Lazy, Fetch::Prefetch] {
        // CRIU checks the size of the log the server writes to.
        std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(log_at_dump).unwrap();
        let restored = dumped.restore(&old, &env, fetch, &format!("{fetch:?}"));
        let mount = &restored.mount;
        let sql = |sql: &str| pg.sql(sql).unwrap_or_else(|e| panic!("{sql}: {e}\nserver log:\n{}", log_tail(&log)));
        if fetch == Fetch::Lazy {
            assert_still_needs_the_old_host(&env, mount, files_on_old_host);
        }
        assert_eq!(sql(PG_CONTENTS), contents, "the tables after the restore");
        assert_eq!(sql("set enable_seqscan = off; select v from big where id = 4242"), row_4242, "through the index");
        // It writes: a row, its WAL, a checkpoint (the table's file).
        assert_eq!(
            sql("insert into small values (1001, 'after the restore'); checkpoint; select count(*) from small"),
            "1001"
        );
        let wal = data.join("pg_wal").join(sql("select pg_walfile_name(pg_current_wal_lsn())"));
        let meta = std::fs::metadata(&wal).unwrap();
        let (uid, gid) = (pg.user.uid.as_raw(), pg.user.gid.as_raw());
        assert_eq!((meta.uid(), meta.gid(), meta.mode()), (uid, gid, 0o100600), "{}", wal.display());
        let root = std::fs::metadata(&data).unwrap();
        assert_eq!((root.uid(), root.gid(), root.mode()), (uid, gid, 0o40700), "the data directory");
        // Another local user meets the old host's modes: the mount lets other
        // users in (the images record a process of another user) and the
        // kernel checks each file's mode and owner.
        let nobody = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
            .arg(data.join("PG_VERSION"))
            .output()
            .unwrap();
        let refused = String::from_utf8_lossy(&nobody.stderr);
        assert!(!nobody.status.success() && refused.contains("Permission denied"), "nobody reads pgdata: {refused}");
        // What it makes is its own (a new table's file, made through the mount).
        let made = sql("create table made_here as select 1 as x; select pg_relation_filepath('made_here')");
        let meta = std::fs::metadata(data.join(&made)).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode()), (uid, gid, 0o100600), "{made}");
        if fetch == Fetch::Lazy {
            let status = mount.status();
            assert_eq!(status["source_needed"], true, "{status}");
            prefetch(&env, mount);
        }
        assert_all_here(&env, mount);
        // The old host can go.
        old.sshd.stop();
        assert_eq!(
            sql("insert into small values (1002, 'old host gone'); checkpoint; select count(*) from small"),
            "1002"
        );
        assert_eq!(sql("select count(*) > 0 from pg_class c join pg_attribute a on a.attrelid = c.oid"), "t");
        // `big` and `docs` as they were, `small` with its two new rows.
        let unchanged = |c: &str| c.split(' ').filter(|t| !t.starts_with("small=")).collect::<Vec<_>>().join(" ");
        let now = sql(PG_CONTENTS);
        assert_eq!(unchanged(&now), unchanged(&contents));
        assert!(now.contains("small=1002/"), "{now}");
        old.sshd.restart();

        restored.end();
    }
}

/// The paths `lazyfs ls IMGDIR --json` lists.
fn recorded_paths(env: &TestEnv, img: &Path) -> Vec<PathBuf> {
    let out = env.run(&["ls", img.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "lazyfs ls: {}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array().unwrap().iter().map(|f| PathBuf::from(f["path"].as_str().unwrap())).collect()
}

/// A plugin's module name and what its `run()` answers.
struct Plugin {
    name: String,
    says: String,
}

/// The application of tests/criu/plugin_app.py in `app`: main.py (and
/// channel.py, which it imports at start), and plugins/ with 40 flat plugins, a package reading a data file beside it and
/// a nested package, all compiled to bytecode there (as a deployed
/// application is). Returns the plugins.
fn write_plugin_app(app: &Path) -> Vec<Plugin> {
    let plugins = app.join("plugins");
    std::fs::create_dir_all(plugins.join("stats")).unwrap();
    std::fs::create_dir_all(plugins.join("deep/inner")).unwrap();
    std::fs::copy(criu_dir().join("plugin_app.py"), app.join("main.py")).unwrap();
    std::fs::copy(criu_dir().join("channel.py"), app.join("channel.py")).unwrap();
    let mut found = Vec::new();
    let mut write = |path: &str, name: &str, says: String| {
        std::fs::write(plugins.join(path), format!("def run():\n    return {says:?}\n")).unwrap();
        found.push(Plugin { name: name.into(), says });
    };
    write("greet.py", "greet", "hello from a plugin".into());
    for i in 0..40 {
        write(&format!("p{i:02}.py"), &format!("p{i:02}"), format!("plugin {i}: {}", i * 7919));
    }
    write("deep/inner/leaf.py", "deep.inner.leaf", "a leaf two packages down".into());
    for package in ["", "deep/", "deep/inner/"] {
        std::fs::write(plugins.join(format!("{package}__init__.py")), "").unwrap();
    }
    std::fs::write(plugins.join("stats/data.json"), serde_json::to_string(&(1..=100).collect::<Vec<_>>()).unwrap())
        .unwrap();
    std::fs::write(
        plugins.join("stats/__init__.py"),
        "import json, os\n\ndef run():\n    with open(os.path.join(os.path.dirname(__file__), 'data.json')) as f:\n        return 'sum %d' % sum(json.load(f))\n",
    )
    .unwrap();
    found.push(Plugin { name: "stats".into(), says: "sum 5050".into() });
    let compiled = Command::new(PYTHON).args(["-m", "compileall", "-q"]).arg(&plugins).status().unwrap();
    assert!(compiled.success(), "compileall");
    found
}

/// A Python application (tests/criu/plugin_app.py) that imports its plugins
/// only after the restore: it finds them by listing its directory, imports
/// them from the old host's bytecode (their mtimes as there, so nothing is
/// compiled or written again) and reads a data file beside one.
#[test]
fn a_restored_python_application_imports_plugins_it_never_opened_before() {
    let _one = one_at_a_time();
    let criu = build_criu();
    let env = TestEnv::new();
    let (app, img, run) = (env.path("app"), env.path("img"), env.path("run"));
    std::fs::create_dir(&run).unwrap();
    let plugins = write_plugin_app(&app);

    start_pids_high();
    let main = app.join("main.py");
    // Python writes bytecode it had to compile (this machine's environment
    // says not to: a deployed application does).
    let args = ["env", "-u", "PYTHONDONTWRITEBYTECODE", PYTHON].map(OsStr::new);
    let args: Vec<&OsStr> = args.into_iter().chain([main.as_os_str(), run.as_os_str()]).collect();
    let original = Reaper::start(&args);
    let pid = original.expect("pid");
    let _original = Tree { pids: vec![pid], script: "main.py" };
    let channel = Channel::open(&run);
    assert_eq!(channel.result("loaded"), serde_json::json!([]), "no plugin is imported before the dump");
    dump(&criu, pid, &img, None, &[]);
    assert_eq!(original.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the application");
    drop(original);
    let recorded = recorded_paths(&env, &img);
    let below = |p: &&PathBuf| p.starts_with(&app) && *p != &app;
    assert_eq!(recorded.iter().filter(below).count(), 0, "no file of the application is open: {recorded:?}");

    let mut old = OldHost::take(&env, &[&app]);
    let on_old_host = snapshot(&old.path_of(&app));
    let mut names: Vec<&str> = plugins.iter().map(|p| p.name.split('.').next().unwrap()).collect();
    names.sort();
    names.dedup();
    let dumped = Dumped { criu, dir: app.clone(), imgdir: img, pids: vec![pid], script: "main.py", options: &[] };
    for fetch in [Fetch::Lazy, Fetch::Prefetch] {
        let restored = dumped.restore(&old, &env, fetch, &format!("{fetch:?}"));
        let mount = &restored.mount;
        if fetch == Fetch::Lazy {
            assert_still_needs_the_old_host(&env, mount, on_old_host.len());
        }
        assert_eq!(channel.result("loaded"), serde_json::json!([]));
        assert_eq!(channel.result("list"), serde_json::json!(names), "the plugins its directory lists");
        let (now, later) = plugins.split_at(plugins.len() - 10);
        let import = |plugin: &Plugin| {
            let imported = channel.result(&format!("import {}", plugin.name));
            assert_eq!(imported["run"], plugin.says.as_str(), "{}", plugin.name);
        };
        now.iter().for_each(import);
        if fetch == Fetch::Lazy {
            assert_still_needs_the_old_host(&env, mount, on_old_host.len());
            prefetch(&env, mount);
        }
        assert_all_here(&env, mount);
        assert_eq!(mount.status()["files_total"], on_old_host.len());
        // The old host can go: the other plugins are here.
        old.sshd.stop();
        later.iter().for_each(import);
        let status = mount.status();
        assert_eq!(status["local_files"], 0, "the old host's bytecode was used, nothing was written: {status}");
        old.sshd.restart();

        restored.end();
    }
    assert_eq!(snapshot(&old.path_of(&app)), on_old_host, "the old host's files are unchanged");
}

/// An application with SQLite connections open at dump time
/// (tests/criu/sqlite_app.py) inserts after the restore. In rollback-journal
/// mode (SQLite's default) SQLite refuses writes on a connection whose
/// database file has another inode number than the one it opened
/// (SQLITE_READONLY_DBMOVED), which every move to another host gives it,
/// unless the mount reports the old host's inode numbers: `lazyfs manifest
/// IMGDIR --subtree DIR` records them there. Without the manifest the
/// restored connection reads but cannot write (which shows the test reaches
/// the check). A database in WAL mode (its -wal and -shm files open, the -shm
/// mapped shared: CRIU maps it again from the mount) writes either way.
#[test]
fn a_restored_sqlite_connection_writes_again_when_the_manifest_keeps_inode_numbers() {
    let _one = one_at_a_time();
    let criu = build_criu();
    let env = TestEnv::new();
    let (app, img, run) = (env.path("app"), env.path("img"), env.path("run"));
    std::fs::create_dir(&run).unwrap();
    std::fs::create_dir_all(app.join("static")).unwrap();
    for i in 0..20 {
        std::fs::write(app.join(format!("static/file-{i}.txt")), content(&i.to_string(), 5000)).unwrap();
    }
    let make = "import sqlite3, sys\n\
                for name, mode in (('app.db', 'delete'), ('wal.db', 'wal')):\n\
                \x20   with sqlite3.connect(sys.argv[1] + '/' + name) as db:\n\
                \x20       db.execute('pragma journal_mode=' + mode)\n\
                \x20       db.execute('create table t(id integer primary key, v text)')\n\
                \x20       db.executemany('insert into t(v) values (?)', [('row %d' % i,) for i in range(100)])\n";
    let made = Command::new(PYTHON).args(["-c", make]).arg(&app).status().unwrap();
    assert!(made.success());

    start_pids_high();
    let script = criu_dir().join("sqlite_app.py");
    // (-B: no bytecode of channel.py written into tests/criu.)
    let args = [PYTHON.as_ref(), "-B".as_ref(), script.as_os_str(), app.as_os_str(), run.as_os_str()];
    let original = Reaper::start(&args);
    let pid = original.expect("pid");
    let _original = Tree { pids: vec![pid], script: "sqlite_app.py" };
    let channel = Channel::open(&run);
    for db in ["app.db", "wal.db"] {
        assert_eq!(channel.result(&format!("insert {db} before the dump")), 101);
    }
    let ino = std::fs::metadata(app.join("app.db")).unwrap().ino();
    assert_eq!(channel.result("ino app.db"), ino);
    // SQLite holds locks on the WAL index while connected.
    dump(&criu, pid, &img, None, &["--file-locks"]);
    assert_eq!(original.expect("exit"), 128 + libc::SIGKILL, "criu dump ends the application");
    drop(original);
    let recorded = recorded_paths(&env, &img);
    assert!(recorded.contains(&app.join("wal.db-shm")), "the WAL index is open: {recorded:?}");
    // The old host's side: the manifest of the whole directory.
    let out = env.run(&["manifest", img.to_str().unwrap(), "--subtree", app.to_str().unwrap()]);
    assert!(out.status.success(), "lazyfs manifest --subtree: {}", String::from_utf8_lossy(&out.stderr));
    let manifest = img.join("lazyfs.manifest");
    let aside = env.path("lazyfs.manifest");
    let dumped = Dumped {
        criu,
        dir: app.clone(),
        imgdir: img,
        pids: vec![pid],
        script: "sqlite_app.py",
        options: &["--file-locks"],
    };

    let mut old = OldHost::take(&env, &[&app]);
    let files_on_old_host = snapshot(&old.path_of(&app)).len();
    let ino_now = || std::fs::metadata(app.join("app.db")).unwrap().ino();
    for (fetch, with_manifest) in [(Fetch::Lazy, true), (Fetch::Prefetch, true), (Fetch::Lazy, false)] {
        if !with_manifest {
            std::fs::rename(&manifest, &aside).unwrap();
        }
        let name = format!("{fetch:?}{}", if with_manifest { "" } else { "-without-manifest" });
        let restored = dumped.restore(&old, &env, fetch, &name);
        let mount = &restored.mount;
        // The images hold the connections as they were at the dump: 101 rows.
        for db in ["app.db", "wal.db"] {
            assert_eq!(channel.result(&format!("count {db}")), 101, "{db}");
        }
        if !with_manifest {
            assert_ne!(channel.result("ino app.db"), ino);
            let refused = channel.ask("insert app.db without the old inode number");
            assert!(refused["error"].as_str().is_some_and(|e| e.contains("readonly")), "{refused}");
            assert_eq!(channel.result("insert wal.db without the old inode number"), 102);
        } else {
            assert_eq!(channel.result("ino app.db"), ino, "the database's inode number on the old host");
            assert_eq!(ino_now(), ino);
            if fetch == Fetch::Lazy {
                assert_still_needs_the_old_host(&env, mount, files_on_old_host);
            }
            for db in ["app.db", "wal.db"] {
                assert_eq!(channel.result(&format!("insert {db} after the restore")), 102, "{db}");
            }
            if fetch == Fetch::Lazy {
                assert_eq!(mount.status()["source_needed"], true);
                prefetch(&env, mount);
            }
            assert_all_here(&env, mount);
            assert_eq!(mount.status()["files_total"], files_on_old_host);
            old.sshd.stop();
            for db in ["app.db", "wal.db"] {
                assert_eq!(channel.result(&format!("insert {db} with the old host gone")), 103, "{db}");
            }
            assert_eq!(ino_now(), ino, "after SQLite's own journal came and went");
            old.sshd.restart();
        }

        restored.end();
        if !with_manifest {
            std::fs::rename(&aside, &manifest).unwrap();
        }
    }
}
