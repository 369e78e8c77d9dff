//! What `lazyfs status` (and `lazyfs mount -f`) draws on a terminal:
//! indicatif bars, one per mount (bytes present of total, rate, ETA, files
//! done) and one per file in flight; a line per failed file.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::control::proto::Status;

/// Files in flight shown at once, beside the mount's bar.
const MAX_FILE_BARS: usize = 8;

pub struct Bars {
    multi: MultiProgress,
    mounts: HashMap<String, MountBars>,
}

struct MountBars {
    total: ProgressBar,
    files: HashMap<Vec<u8>, ProgressBar>,
    failures_shown: HashSet<Vec<u8>>,
}

fn mount_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

fn file_style() -> ProgressStyle {
    ProgressStyle::with_template("  {prefix:40!} [{bar:20}] {binary_bytes}/{binary_total_bytes}")
        .expect("valid template")
        .progress_chars("=> ")
}

impl Bars {
    /// Bars on stderr (the terminal a person watches).
    pub fn new() -> Bars {
        Bars { multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)), mounts: HashMap::new() }
    }

    pub fn update(&mut self, statuses: &[Status]) {
        for status in statuses {
            let multi = &self.multi;
            let bars = self.mounts.entry(status.mountpoint.clone()).or_insert_with(|| {
                let total = multi.add(ProgressBar::new(status.bytes_total).with_style(mount_style()));
                total.set_prefix(status.mountpoint.clone());
                total.enable_steady_tick(Duration::from_millis(200));
                MountBars { total, files: HashMap::new(), failures_shown: HashSet::new() }
            });
            bars.total.set_length(status.bytes_total);
            bars.total.set_position(status.bytes_present);
            bars.total.set_message(format!(
                "files {}/{}{} ({}{})",
                status.files_present,
                status.files_total,
                if status.files_failed > 0 { format!(", {} failed", status.files_failed) } else { String::new() },
                status.state,
                detached_note(status),
            ));
            let in_flight: Vec<_> = status.files.iter().filter(|f| f.state == "fetching").take(MAX_FILE_BARS).collect();
            let keep: HashSet<&[u8]> = in_flight.iter().map(|f| f.path.as_slice()).collect();
            bars.files.retain(|path, bar| {
                let stays = keep.contains(path.as_slice());
                if !stays {
                    bar.finish_and_clear();
                    multi.remove(bar);
                }
                stays
            });
            for file in in_flight {
                let bar = bars.files.entry(file.path.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(file.size).with_style(file_style()));
                    bar.set_prefix(String::from_utf8_lossy(&file.mount_path).into_owned());
                    bar
                });
                bar.set_position(file.bytes_present);
            }
            for file in status.files.iter().filter(|f| f.state == "failed") {
                if bars.failures_shown.insert(file.path.clone()) {
                    let _ = multi.println(format!("failed: {}: {}", String::from_utf8_lossy(&file.path), file.error));
                }
            }
            if status.state == "complete" {
                bars.total.finish();
            }
        }
    }

    /// Leaves the last drawing on the screen.
    pub fn finish(self) {
        for bars in self.mounts.values() {
            for bar in bars.files.values() {
                bar.finish_and_clear();
            }
            bars.total.abandon();
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

/// One line per mount, for a reader that is not a terminal.
pub fn plain_line(status: &Status) -> String {
    let rate = status.rate_bytes_per_s / (1024.0 * 1024.0);
    let eta = status.eta_s.map_or("?".to_string(), |s| format!("{s:.0}s"));
    format!(
        "{}: {} {}/{} bytes, {}/{} files present, {} failed, {rate:.1} MiB/s, ETA {eta}{}",
        status.mountpoint,
        status.state,
        status.bytes_present,
        status.bytes_total,
        status.files_present,
        status.files_total,
        status.files_failed,
        detached_note(status),
    )
}

/// ", detached (held open by PIDs ...)" for a detached mount.
fn detached_note(status: &Status) -> String {
    if !status.detached {
        return String::new();
    }
    let pids: Vec<String> = status.holders.iter().map(u32::to_string).collect();
    format!(", detached (held open by PIDs {})", pids.join(", "))
}
