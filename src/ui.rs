//! What `lazyfs status` (and `lazyfs mount -f`) prints for a person: one
//! plain line per mount when not on a terminal; on a terminal a bar per mount
//! and one per file in flight, and a line per failed file: drawn once, or
//! redrawn in place (indicatif) while watching. Sizes and rates are in
//! binary units here, exact in `--json`; the rate and ETA are the mount's own
//! (see `status::Meter`), the same in every form.

use std::collections::{HashMap, HashSet};

use indicatif::{BinaryBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::control::proto::{FailedDir, FileState, FileStatus, MountState, Status};

/// Files in flight shown at once, beside the mount's bar.
const MAX_FILE_BARS: usize = 8;
const MOUNT_BAR: usize = 30;
const FILE_BAR: usize = 20;

/// Text from elsewhere (a name, a store's words) as a person may see it:
/// control characters (a newline, a terminal escape) shown escaped.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a mount is doing, its bytes, files, rate and ETA, in words.
pub fn summary(status: &Status) -> String {
    let state = status.state();
    let doing = match state {
        MountState::Fetching if !status.prefetch => {
            format!("lazy: fetches only what is read (`lazyfs prefetch {}` fetches the rest)", status.mountpoint)
        }
        MountState::Fetching => "fetching in the background".to_string(),
        MountState::Degraded => format!("degraded: {}", status.degraded_reason),
        // Nothing serves it: the counts below mean nothing.
        MountState::Failed => return format!("failed: {}", status.failure),
        // Settled, but not every byte is here: say so before the counts do.
        MountState::Complete if status.files_failed > 0 || status.dirs_failed > 0 => {
            let dirs = match status.dirs_failed {
                0 => String::new(),
                n => format!(" and {n} director(ies) that could not be listed"),
            };
            format!("complete except {} failed file(s){dirs}", status.files_failed)
        }
        MountState::Complete => state.word().to_string(),
    };
    let mut text = format!(
        "{doing}: {}/{}, {}/{} files present",
        BinaryBytes(status.bytes_present),
        BinaryBytes(status.bytes_total),
        status.files_present,
        status.files_total
    );
    if status.local_files > 0 {
        text += &format!("; {} local file(s), {}", status.local_files, BinaryBytes(status.local_bytes));
    }
    if status.files_failed > 0 && state != MountState::Complete {
        text += &format!(", {} failed", status.files_failed);
    }
    // The files of those are not counted yet (the words `lazyfs wait` uses).
    if status.dirs_unlisted > 0 {
        text += &format!(", {} director(ies) of the tree not listed yet", status.dirs_unlisted);
    }
    if status.dirs_failed > 0 && state != MountState::Complete {
        text += &format!(", {} director(ies) could not be listed", status.dirs_failed);
    }
    if let Some(rate) = status.rate_bytes_per_s.filter(|_| state != MountState::Complete) {
        text += &format!(", {}/s", BinaryBytes(rate as u64));
    }
    if let Some(eta) = status.eta_s {
        text += &format!(", ETA {}", duration(eta));
    }
    if status.detached {
        let pids: Vec<String> = status.holders.iter().map(u32::to_string).collect();
        text += &format!(", detached (held open by PIDs {})", pids.join(", "));
    }
    if !status.source_needed {
        text += "; every file is here: the old host is no longer needed";
    }
    if status.restarts > 0 {
        text +=
            &format!("; serving process restarted {} time(s), last: {}", status.restarts, status.last_restart_reason);
    }
    text
}

/// `42s`, `3m05s`, `2h07m`.
fn duration(seconds: f64) -> String {
    let s = seconds.ceil() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// One line per mount, for a reader that is not a terminal.
pub fn plain_line(status: &Status) -> String {
    format!("{}: {}", status.mountpoint, summary(status))
}

/// `failed: PATH: WHY`, without saying the path twice when the reason
/// starts with it.
pub fn failure_line(file: &FileStatus) -> String {
    format!("failed: {}", path_and_reason(&file.path, &file.error))
}

/// `could not list directory PATH: WHY`, the same for a directory of the tree.
pub fn dir_failure_line(dir: &FailedDir) -> String {
    format!("could not list directory {}", path_and_reason(&dir.path, &dir.error))
}

fn path_and_reason(path: &[u8], error: &str) -> String {
    let path = String::from_utf8_lossy(path);
    let reason = error.strip_prefix(&format!("{path}: ")).unwrap_or(error);
    format!("{path}: {reason}")
}

fn in_flight(status: &Status) -> impl Iterator<Item = &FileStatus> {
    status.files.iter().filter(|f| f.state() == FileState::Fetching).take(MAX_FILE_BARS)
}

fn failures(status: &Status) -> impl Iterator<Item = &FileStatus> {
    status.files.iter().filter(|f| f.state() == FileState::Failed)
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 { width } else { (done as u128 * width as u128 / total as u128) as usize };
    let head = usize::from(filled < width);
    format!("{}{}{}", "=".repeat(filled), ">".repeat(head), " ".repeat(width - filled - head))
}

fn file_line(file: &FileStatus, bar_text: &str) -> String {
    format!(
        "  {:40} [{bar_text}] {}/{}",
        String::from_utf8_lossy(&file.mount_path),
        BinaryBytes(file.bytes_present),
        BinaryBytes(file.size)
    )
}

/// `lazyfs status` on a terminal, once: the bars as they stand now.
pub fn bars_once(status: &Status) -> Vec<String> {
    let mut lines = vec![format!(
        "{} [{}] {}",
        status.mountpoint,
        bar(status.bytes_present, status.bytes_total, MOUNT_BAR),
        summary(status)
    )];
    lines.extend(in_flight(status).map(|f| file_line(f, &bar(f.bytes_present, f.size, FILE_BAR))));
    lines.extend(failures(status).map(failure_line));
    lines.extend(status.failed_dirs.iter().map(dir_failure_line));
    lines
}

/// Bars redrawn in place as snapshots come (`status --watch`, `mount -f`).
pub struct Bars {
    multi: MultiProgress,
    mounts: HashMap<String, MountBars>,
}

struct MountBars {
    total: ProgressBar,
    files: HashMap<Vec<u8>, ProgressBar>,
    /// Failed files and directories already printed.
    failures_shown: HashSet<Vec<u8>>,
}

fn mount_style() -> ProgressStyle {
    ProgressStyle::with_template(&format!("{{prefix:.bold}} [{{bar:{MOUNT_BAR}.cyan/blue}}] {{msg}}"))
        .expect("valid template")
        .progress_chars("=> ")
}

fn file_style() -> ProgressStyle {
    ProgressStyle::with_template(&format!("  {{prefix:40!}} [{{bar:{FILE_BAR}}}] {{msg}}"))
        .expect("valid template")
        .progress_chars("=> ")
}

impl Bars {
    /// Bars on stderr (the terminal a person watches).
    pub fn new() -> Bars {
        Bars { multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)), mounts: HashMap::new() }
    }

    /// Lines printed above the bars (instead of through them).
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    pub fn update(&mut self, statuses: &[Status]) {
        for status in statuses {
            let multi = &self.multi;
            let bars = self.mounts.entry(status.mountpoint.clone()).or_insert_with(|| {
                let total = multi.add(ProgressBar::new(status.bytes_total).with_style(mount_style()));
                total.set_prefix(status.mountpoint.clone());
                MountBars { total, files: HashMap::new(), failures_shown: HashSet::new() }
            });
            bars.total.set_length(status.bytes_total);
            bars.total.set_position(status.bytes_present);
            bars.total.set_message(summary(status));
            let in_flight: Vec<_> = in_flight(status).collect();
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
                bar.set_message(format!("{}/{}", BinaryBytes(file.bytes_present), BinaryBytes(file.size)));
            }
            for file in failures(status) {
                if bars.failures_shown.insert(file.path.clone()) {
                    let _ = multi.println(failure_line(file));
                }
            }
            for dir in &status.failed_dirs {
                if bars.failures_shown.insert(dir.path.clone()) {
                    let _ = multi.println(dir_failure_line(dir));
                }
            }
            if status.state() == MountState::Complete {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_words_cannot_drive_the_terminal() {
        assert_eq!(
            printable("ckpt on host\nlazyfs: ok \x1b[2K\u{9b}1m é"),
            "ckpt on host\\nlazyfs: ok \\u{1b}[2K\\u{9b}1m é"
        );
    }

    fn status(state: MountState, prefetch: bool, present: u64, eta: Option<f64>) -> Status {
        Status {
            mountpoint: "/mnt".into(),
            state: state.into(),
            prefetch,
            bytes_total: 218_112_400,
            bytes_present: present,
            files_total: 40,
            files_present: 3,
            rate_bytes_per_s: Some(6.5 * 1024.0 * 1024.0),
            eta_s: eta,
            source_needed: true,
            ..Default::default()
        }
    }

    #[test]
    fn text_is_in_human_units() {
        let line = plain_line(&status(MountState::Fetching, true, 50_864_491, Some(24.2)));
        assert_eq!(
            line,
            "/mnt: fetching in the background: 48.51 MiB/208.01 MiB, 3/40 files present, 6.50 MiB/s, ETA 25s"
        );
        let line = plain_line(&status(MountState::Complete, true, 218_112_400, None));
        assert_eq!(line, "/mnt: complete: 208.01 MiB/208.01 MiB, 3/40 files present");
        let gone = Status {
            source_needed: false,
            local_files: 2,
            local_bytes: 3 << 20,
            ..status(MountState::Complete, true, 218_112_400, None)
        };
        assert_eq!(
            plain_line(&gone),
            "/mnt: complete: 208.01 MiB/208.01 MiB, 3/40 files present; 2 local file(s), 3.00 MiB; every file is here: the old host is no longer needed"
        );
    }

    #[test]
    fn directories_not_listed_yet_or_that_could_not_be_listed_are_said() {
        let unlisted = Status { dirs_unlisted: 3, ..status(MountState::Fetching, true, 0, None) };
        let line = plain_line(&unlisted);
        assert!(line.contains("3/40 files present, 3 director(ies) of the tree not listed yet"), "{line}");
        let failed = Status { dirs_failed: 1, ..status(MountState::Complete, true, 218_112_400, None) };
        let line = plain_line(&failed);
        assert!(
            line.starts_with("/mnt: complete except 0 failed file(s) and 1 director(ies) that could not"),
            "{line}"
        );
    }

    #[test]
    fn a_lazy_mount_says_it_waits_for_reads() {
        let line = plain_line(&status(MountState::Fetching, false, 0, None));
        assert!(line.contains("lazy: fetches only what is read (`lazyfs prefetch /mnt` fetches the rest)"), "{line}");
        assert!(!line.contains("ETA"), "{line}");
    }

    #[test]
    fn durations_and_bars() {
        assert_eq!(duration(0.0), "0s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7620.0), "2h07m");
        assert_eq!(bar(0, 10, 4), ">   ");
        assert_eq!(bar(5, 10, 4), "==> ");
        assert_eq!(bar(10, 10, 4), "====");
        assert_eq!(bar(0, 0, 4), "====");
    }

    #[test]
    fn a_failure_names_its_path_once() {
        let file = FileStatus {
            path: b"/usr/lib/libz.so".to_vec(),
            error: "/usr/lib/libz.so: not found on the source (looked for /srv/old/usr/lib/libz.so)".into(),
            ..Default::default()
        };
        assert_eq!(
            failure_line(&file),
            "failed: /usr/lib/libz.so: not found on the source (looked for /srv/old/usr/lib/libz.so)"
        );
    }
}
