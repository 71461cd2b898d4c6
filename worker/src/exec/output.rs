//! A run's output: both streams read line by line, numbered in arrival order, capped, and
//! handed to the reporter as soon as the collector is idle (a quiet line leaves at once;
//! under load, what has queued up meanwhile leaves together).
//!
//! - A line longer than `max_line_bytes` is split there (never inside a UTF-8 character).
//! - Bytes that are not UTF-8, and NUL (which Postgres text cannot hold), are written as
//!   `\xNN` (as Python's `backslashreplace`); everything else is kept as printed.
//! - Past `max_lines` lines or `max_output_bytes` bytes (as printed, line ends not
//!   counted), output is read
//!   and counted but not kept, and one SYSTEM line at the end says what and how much was
//!   dropped; [`OutputSummary`] tells the run. SYSTEM lines of the worker (timeouts,
//!   stops) are kept past the cap: they say why a run ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use cloudtask_core::ids::RunId;
use cloudtask_core::run::{LogLine, LogStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::ExecLimits;
use crate::report::{Report, Reporter};

/// Most lines, and bytes of text, one report of the collector carries.
const FLUSH_LINES: usize = 1_000;
const FLUSH_BYTES: usize = 256 << 10;

/// A line as read: its text, and how many bytes of output it was (the caps count these).
struct Line {
    stream: LogStream,
    text: String,
    at: DateTime<Utc>,
    bytes: usize,
}

/// Where a run's lines go: the collector's channel, and what the readers count once the
/// cap is reached (they stop making lines then, so a program that prints gigabytes past
/// its cap costs a byte count, not a line each).
#[derive(Clone)]
pub(super) struct LineSink {
    tx: mpsc::Sender<Line>,
    overflow: Arc<Overflow>,
}

#[derive(Default)]
struct Overflow {
    /// Set by the collector at the cap: readers only count from now on.
    discarding: AtomicBool,
    lines: AtomicU64,
    bytes: AtomicU64,
}

impl LineSink {
    /// A line of the worker's own (a timeout, a stop): kept past the cap.
    pub(super) async fn system(&self, note: String) {
        let line = Line {
            stream: LogStream::System,
            bytes: note.len(),
            text: note,
            at: Utc::now(),
        };
        let _ = self.tx.send(line).await;
    }
}

/// What became of a run's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputSummary {
    /// Lines kept (stored), and their bytes of output as printed.
    pub lines: u64,
    pub bytes: u64,
    /// Lines and bytes of output dropped at the cap (0 when it was not reached).
    pub dropped_lines: u64,
    pub dropped_bytes: u64,
}

impl OutputSummary {
    /// The run's output reached its cap (lines or bytes) and some of it was dropped.
    pub fn capped(&self) -> bool {
        self.dropped_lines > 0 || self.dropped_bytes > 0
    }
}

/// A sink for the readers and the collector that drains it; the collector ends once every
/// clone of the sink is gone.
pub(super) fn channel(
    run: RunId,
    limits: ExecLimits,
    reporter: Reporter,
) -> (
    LineSink,
    impl Future<Output = OutputSummary> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(1024);
    let overflow = Arc::new(Overflow::default());
    let collector = collect(run, rx, overflow.clone(), limits, reporter);
    (LineSink { tx, overflow }, collector)
}

/// Starts reading the child's stdout and stderr into `sink`.
pub(super) fn read_streams(
    child: &mut tokio::process::Child,
    max_line_bytes: usize,
    sink: &LineSink,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let reader = read_lines(out, LogStream::Stdout, max_line_bytes, sink.clone());
        readers.push(tokio::spawn(reader));
    }
    if let Some(err) = child.stderr.take() {
        let reader = read_lines(err, LogStream::Stderr, max_line_bytes, sink.clone());
        readers.push(tokio::spawn(reader));
    }
    readers
}

/// Reads one stream into lines of at most `max` bytes (of output, before escaping).
async fn read_lines(stream: impl AsyncRead + Unpin, which: LogStream, max: usize, sink: LineSink) {
    let max = max.max(4); // room for one character of any width
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut line: Vec<u8> = Vec::new();
    // Past the cap: whether a line is open (bytes read since the last newline).
    let mut open = false;
    let overflow = &sink.overflow;
    while let Ok(available) = reader.fill_buf().await {
        let discarding = overflow.discarding.load(Ordering::Relaxed);
        if discarding && !line.is_empty() {
            overflow.count(0, line.len());
            line.clear();
            open = true;
        }
        if available.is_empty() {
            if open {
                overflow.count(1, 0);
            } else if !line.is_empty() && sink.tx.send(emit(which, &line)).await.is_err() {
                return;
            }
            break;
        }
        if discarding {
            // Count what is read, keep nothing.
            let newlines = memchr::memchr_iter(b'\n', available).count();
            overflow.count(newlines, available.len() - newlines);
            open = available.last() != Some(&b'\n');
            let used = available.len();
            reader.consume(used);
            continue;
        }
        let room = max.saturating_sub(line.len()).max(1);
        let window = &available[..available.len().min(room)];
        let (used, piece) = match memchr::memchr(b'\n', window) {
            Some(newline) => {
                line.extend_from_slice(&window[..newline]);
                (newline + 1, Some(line.len()))
            }
            None => {
                line.extend_from_slice(window);
                let full = line.len() >= max;
                (window.len(), full.then(|| char_boundary(&line)))
            }
        };
        reader.consume(used);
        if let Some(end) = piece {
            let sent = sink.tx.send(emit(which, &line[..end])).await;
            line.drain(..end);
            if sent.is_err() {
                return;
            }
        }
    }
}

impl Overflow {
    fn count(&self, lines: usize, bytes: usize) {
        self.lines.fetch_add(lines as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

fn emit(which: LogStream, line: &[u8]) -> Line {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Line {
        stream: which,
        text: escape(line),
        at: Utc::now(),
        bytes: line.len(),
    }
}

/// Where a line cut at its length limit ends: before a character whose bytes are not all
/// there yet (they lead the next piece), else at its end.
fn char_boundary(line: &[u8]) -> usize {
    let len = line.len();
    for back in 1..=3.min(len) {
        let byte = line[len - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let width = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return len, // ASCII or not a lead at all: nothing to keep back
        };
        return if back < width { len - back } else { len };
    }
    len
}

/// Output bytes as text: UTF-8 kept, every other byte and NUL written as `\xNN`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        if valid.contains('\0') {
            text.push_str(&valid.replace('\0', "\\x00"));
        } else {
            text.push_str(valid);
        }
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

/// Numbers the lines of both streams in arrival order, applies the caps, and hands them
/// to the reporter: at once when nothing else is waiting, together when more is.
async fn collect(
    run: RunId,
    mut rx: mpsc::Receiver<Line>,
    overflow: Arc<Overflow>,
    limits: ExecLimits,
    reporter: Reporter,
) -> OutputSummary {
    let mut summary = OutputSummary::default();
    let mut next_offset: u64 = 0;
    let mut batch: Vec<LogLine> = Vec::new();
    let mut batch_bytes = 0;
    let mut cap = Cap::default();
    while let Some(first) = rx.recv().await {
        let mut received = Some(first);
        while let Some(Line {
            stream,
            text,
            at,
            bytes,
        }) = received
        {
            let size = bytes as u64;
            let over =
                summary.lines >= limits.max_lines || summary.bytes + size > limits.max_output_bytes;
            if stream != LogStream::System && (over || cap.reached) {
                if !cap.reached {
                    cap.reached = true;
                    cap.by_lines = summary.lines >= limits.max_lines;
                    overflow.discarding.store(true, Ordering::Relaxed);
                }
                summary.dropped_lines += 1;
                summary.dropped_bytes += size;
            } else {
                if stream != LogStream::System {
                    summary.lines += 1;
                    summary.bytes += size;
                }
                batch_bytes += text.len();
                batch.push(LogLine {
                    offset: next_offset,
                    stream,
                    at,
                    text,
                });
                next_offset += 1;
            }
            // Batch only what is waiting already: a quiet line does not wait for company.
            received = if batch.len() < FLUSH_LINES && batch_bytes < FLUSH_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            reporter.send(Report::Logs {
                run,
                lines: std::mem::take(&mut batch),
            });
            batch_bytes = 0;
        }
    }
    summary.dropped_lines += overflow.lines.load(Ordering::Relaxed);
    summary.dropped_bytes += overflow.bytes.load(Ordering::Relaxed);
    if summary.capped() {
        let limit = if cap.by_lines {
            format!("{} lines", limits.max_lines)
        } else {
            format!("{} bytes", limits.max_output_bytes)
        };
        let text = format!(
            "output limit reached ({limit}): {} more lines ({} bytes) were dropped; \
             {} lines ({} bytes) were kept",
            summary.dropped_lines, summary.dropped_bytes, summary.lines, summary.bytes
        );
        reporter.send(Report::Logs {
            run,
            lines: vec![LogLine {
                offset: next_offset,
                stream: LogStream::System,
                at: Utc::now(),
                text,
            }],
        });
    }
    summary
}

/// The collector's view of the cap.
#[derive(Default)]
struct Cap {
    reached: bool,
    /// The line cap (not the byte cap) was the one reached.
    by_lines: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_that_are_not_text_are_escaped_and_the_rest_kept() {
        assert_eq!(escape(b"plain \\ text \xc3\xa9"), "plain \\ text é");
        assert_eq!(escape(b"a\0b\xffc\xc3"), "a\\x00b\\xffc\\xc3");
        assert_eq!(escape(b"\x1b[1mbold\x1b[0m"), "\x1b[1mbold\x1b[0m");
    }

    #[test]
    fn a_cut_never_falls_inside_a_character() {
        assert_eq!(char_boundary(b"abc"), 3);
        assert_eq!(char_boundary("ab\u{e9}".as_bytes()), 4);
        assert_eq!(char_boundary(&"ab\u{e9}".as_bytes()[..3]), 2);
        assert_eq!(char_boundary(&"a\u{1f600}".as_bytes()[..4]), 1);
        assert_eq!(char_boundary("a\u{1f600}".as_bytes()), 5);
        // Not UTF-8 at all: cut where the limit is.
        assert_eq!(char_boundary(b"ab\xff\xff"), 4);
    }
}
