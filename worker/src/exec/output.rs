//! A run's output: both streams read line by line (long lines split, invalid UTF-8
//! replaced), numbered in arrival order, capped, and handed to the reporter in batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::RunId;
use cloudtask_core::run::{LogLine, LogStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::ExecLimits;
use crate::report::{Report, Reporter};

/// Lines go to the reporter at least this often while a run is producing them.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_LINES: usize = 500;

pub(super) type Line = (LogStream, String, DateTime<Utc>);

/// Starts reading the child's stdout and stderr into `lines`.
pub(super) fn read_streams(
    child: &mut tokio::process::Child,
    max_line_bytes: usize,
    lines: &mpsc::Sender<Line>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let reader = read_lines(out, LogStream::Stdout, max_line_bytes, lines.clone());
        readers.push(tokio::spawn(reader));
    }
    if let Some(err) = child.stderr.take() {
        let reader = read_lines(err, LogStream::Stderr, max_line_bytes, lines.clone());
        readers.push(tokio::spawn(reader));
    }
    readers
}

/// Reads one stream into lines of at most `max` bytes.
async fn read_lines(
    stream: impl AsyncRead + Unpin,
    which: LogStream,
    max: usize,
    lines: mpsc::Sender<Line>,
) {
    let mut reader = BufReader::new(stream);
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        (which, text, Utc::now())
    };
    while let Ok(available) = reader.fill_buf().await {
        if available.is_empty() {
            if !line.is_empty() && lines.send(emit(&mut line)).await.is_err() {
                return;
            }
            break;
        }
        let room = max.saturating_sub(line.len()).max(1);
        let window = &available[..available.len().min(room)];
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                line.extend_from_slice(&window[..newline]);
                (newline + 1, true)
            }
            None => {
                line.extend_from_slice(window);
                (window.len(), line.len() >= max)
            }
        };
        reader.consume(used);
        if complete && lines.send(emit(&mut line)).await.is_err() {
            return;
        }
    }
}

/// Numbers the lines of both streams in arrival order, applies the cap, and hands
/// batches to the reporter.
pub(super) async fn collect(
    run: RunId,
    mut rx: mpsc::Receiver<Line>,
    limits: ExecLimits,
    reporter: Reporter,
) {
    let mut next_offset: u64 = 0;
    let mut dropped: u64 = 0;
    let mut batch: Vec<LogLine> = Vec::new();
    let flush = |batch: &mut Vec<LogLine>| {
        if !batch.is_empty() {
            reporter.send(Report::Logs {
                run,
                lines: std::mem::take(batch),
            });
        }
    };
    loop {
        let received = if batch.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(FLUSH_EVERY, rx.recv()).await {
                Ok(line) => line,
                Err(_) => {
                    flush(&mut batch);
                    continue;
                }
            }
        };
        let Some((stream, text, at)) = received else {
            break;
        };
        // SYSTEM lines (timeouts, stops) are kept past the cap: they say why a run ended.
        if next_offset >= limits.max_lines && stream != LogStream::System {
            dropped += 1;
            continue;
        }
        batch.push(LogLine {
            offset: next_offset,
            stream,
            at,
            text,
        });
        next_offset += 1;
        if batch.len() >= FLUSH_LINES {
            flush(&mut batch);
        }
    }
    if dropped > 0 {
        batch.push(LogLine {
            offset: next_offset,
            stream: LogStream::System,
            at: Utc::now(),
            text: format!(
                "output capped at {} lines: {dropped} more lines were dropped",
                limits.max_lines
            ),
        });
    }
    flush(&mut batch);
}
