//! What `lazyfs push` shows while it runs: bars on a terminal, a plain line
//! now and then otherwise, or one JSON object per line (`--json`), ending
//! with the summary.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use indicatif::{BinaryBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::push::{Progress, PushError, PushRequest, Summary};

/// How a push shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// indicatif bars on stderr.
    Bars,
    /// A line on stderr every `PLAIN_EVERY`.
    Plain,
    /// JSON lines on stdout every `JSON_EVERY`.
    Json,
}

const PLAIN_EVERY: Duration = Duration::from_secs(10);
const JSON_EVERY: Duration = Duration::from_secs(1);
const BARS_EVERY: Duration = Duration::from_millis(100);

/// Runs the push, showing its progress as `show` says.
pub fn run(request: &PushRequest, show: Show) -> Result<Summary, PushError> {
    let progress = Progress::default();
    let started = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let progress = &progress;
        let reporter = scope.spawn(move || report(request, progress, started, show, &done_rx));
        let result = crate::push::push(request, progress);
        drop(done_tx);
        let _ = reporter.join();
        if let (Show::Json, Ok(summary)) = (show, &result) {
            let mut line = progress_json(request, progress, started, "done");
            line["files"] = json!(summary.files);
            line["skipped"] = summary
                .skipped
                .iter()
                .map(|(path, reason)| json!({"path": path.to_string_lossy(), "reason": reason}))
                .collect();
            println!("{line}");
        }
        result
    })
}

/// Shows the progress until the push ends (`done` closes).
fn report(request: &PushRequest, progress: &Progress, started: Instant, show: Show, done: &mpsc::Receiver<()>) {
    let every = match show {
        Show::Bars => BARS_EVERY,
        Show::Plain => PLAIN_EVERY,
        Show::Json => JSON_EVERY,
    };
    let bars = (show == Show::Bars).then(PushBars::new);
    loop {
        let finished = match done.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        match (&bars, show) {
            (Some(bars), _) => bars.update(progress),
            (None, Show::Json) if !finished => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", progress_json(request, progress, started, phase(progress)));
                let _ = out.flush();
            }
            (None, Show::Plain) if !finished => eprintln!("lazyfs: push: {}", words(progress)),
            _ => {}
        }
        if finished {
            if let Some(bars) = bars {
                bars.finish();
            }
            return;
        }
    }
}

fn phase(progress: &Progress) -> &'static str {
    if progress.index_stored.load(Ordering::Relaxed) { "uploading" } else { "hashing" }
}

/// The progress in words: what was read and hashed, what went up.
fn words(p: &Progress) -> String {
    let mut text = format!("hashed {}", hashed(p));
    if p.index_stored.load(Ordering::Relaxed) {
        text += &format!("; index stored (mounts can start); {}", objects(p));
    }
    text
}

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// `12.00 MiB/40.00 MiB`
fn hashed(p: &Progress) -> String {
    format!("{}/{}", BinaryBytes(get(&p.bytes_hashed)), BinaryBytes(get(&p.bytes_total)))
}

/// `objects 3/10: 2 sent (8.00 MiB), 1 already in the store`
fn objects(p: &Progress) -> String {
    format!(
        "objects {}/{}: {} sent ({}), {} already in the store",
        get(&p.objects_done),
        get(&p.objects_total),
        get(&p.objects_sent),
        BinaryBytes(get(&p.bytes_sent)),
        get(&p.objects_present)
    )
}

/// One JSON line of progress (`phase`: hashing, uploading or done).
fn progress_json(request: &PushRequest, p: &Progress, started: Instant, phase: &str) -> Value {
    json!({
        "url": request.url.to_string(),
        "phase": phase,
        "files_total": get(&p.files_total),
        "bytes_total": get(&p.bytes_total),
        "bytes_hashed": get(&p.bytes_hashed),
        "index_stored": p.index_stored.load(Ordering::Relaxed),
        "objects_total": get(&p.objects_total),
        "object_bytes_total": get(&p.object_bytes_total),
        "objects_done": get(&p.objects_done),
        "bytes_done": get(&p.bytes_done),
        "objects_sent": get(&p.objects_sent),
        "bytes_sent": get(&p.bytes_sent),
        "objects_present": get(&p.objects_present),
        "elapsed_s": started.elapsed().as_secs_f64(),
    })
}

/// The summary line a person reads at the end.
pub fn summary_line(request: &PushRequest, summary: &Summary) -> String {
    format!(
        "pushed {} files ({}) to {}: {} objects, {} sent ({}), {} already in the store{}; copy IMGDIR \
         (with its lazyfs.pushed) to the new hosts and mount with `lazyfs mount MOUNTPOINT IMGDIR {}`",
        summary.files,
        BinaryBytes(summary.bytes),
        request.url,
        summary.objects,
        summary.objects_sent,
        BinaryBytes(summary.bytes_sent),
        summary.objects_present,
        if summary.skipped.is_empty() { String::new() } else { format!("; left out {}", summary.skipped.len()) },
        request.url
    )
}

/// Two bars: reading and hashing, then sending.
struct PushBars {
    _multi: MultiProgress,
    hashing: ProgressBar,
    sending: ProgressBar,
}

impl PushBars {
    fn new() -> PushBars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template("{prefix:>9.bold} [{bar:30.cyan/blue}] {msg}")
            .expect("valid template")
            .progress_chars("=> ");
        let bar = |prefix: &'static str| {
            let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
            bar.set_prefix(prefix);
            bar
        };
        let (hashing, sending) = (bar("hashing"), bar("uploading"));
        PushBars { _multi: multi, hashing, sending }
    }

    fn update(&self, p: &Progress) {
        self.hashing.set_length(get(&p.bytes_total));
        self.hashing.set_position(get(&p.bytes_hashed));
        self.hashing.set_message(hashed(p));
        self.sending.set_length(get(&p.object_bytes_total));
        self.sending.set_position(get(&p.bytes_done));
        if p.index_stored.load(Ordering::Relaxed) {
            self.sending.set_message(objects(p));
        }
    }

    fn finish(self) {
        self.hashing.abandon();
        self.sending.abandon();
    }
}
