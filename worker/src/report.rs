//! The one writer of run results: every log batch and outcome goes through here, in
//! order, to the API. What the API cannot take now is written to an on-disk spool under
//! the data folder and delivered when it is back, in the same order; a spool left by an
//! earlier process is delivered first. Ingest is idempotent (log lines by run and offset,
//! outcomes only onto unfinished runs), so a report delivered twice lands once.
//!
//! Requests are sized to what the API takes (`MAX_REPORT_BODY_BYTES` of JSON,
//! `MAX_REPORT_LINES` lines): a log report too large for one request is split. An API
//! that refuses a request as too large anyway (413: a smaller limit, a proxy in between)
//! gets the same reports again in smaller requests, down to one line, and a line too
//! large on its own is cut, with a marker saying how much: nothing is dropped unsaid.
//! Log lines leave as soon as the writer is free; only starts and outcomes wait a moment
//! for company.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloudtask_core::protocol::{MAX_REPORT_BODY_BYTES, MAX_REPORT_LINES};
use cloudtask_core::run::LogLine;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::{ApiClient, CallError};

/// Room in a request for what is not a report (the envelope), and between reports.
const ENVELOPE_BYTES: usize = 64;
/// The smallest body limit the writer shrinks to when the API refuses requests as too
/// large; below it, a single line is cut instead.
const MIN_BODY_BYTES: usize = 8 << 10;
/// How long a start or an outcome waits for others before it leaves, when the writer was
/// idle: the starts and outcomes of runs fired together travel in one request, sent after
/// their processes have started rather than while they start. Log lines do not wait.
const LINGER: Duration = Duration::from_millis(20);
/// How long a shutting-down worker keeps trying before it leaves the rest in the spool.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

pub use cloudtask_core::protocol::Report;

/// Hands reports to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Report>,
    /// Reports accepted but not delivered yet (for tests and shutdown).
    pending: watch::Receiver<usize>,
}

impl Reporter {
    pub fn send(&self, report: Report) {
        // The writer outlives every sender but at the very end of shutdown.
        let _ = self.tx.send(report);
    }

    /// A reporter whose reports land in the returned channel (for unit tests).
    #[cfg(test)]
    pub(crate) fn capture() -> (Reporter, mpsc::UnboundedReceiver<Report>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (_, pending) = watch::channel(0);
        (Reporter { tx, pending }, rx)
    }

    /// Waits until everything sent so far has been delivered.
    pub async fn delivered(&self) {
        let mut pending = self.pending.clone();
        let _ = pending.wait_for(|n| *n == 0).await;
    }
}

/// Starts the writer. It runs until `shutdown`, then delivers what it can for a few
/// seconds and spools the rest.
pub fn spawn(
    client: Arc<ApiClient>,
    spool_dir: PathBuf,
    shutdown: CancellationToken,
) -> (Reporter, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (pending_tx, pending) = watch::channel(0);
    let writer = Writer {
        client,
        spool: spool_dir.join("reports.jsonl"),
        spool_dir,
        queue: VecDeque::new(),
        body_limit: MAX_REPORT_BODY_BYTES,
        one_at_a_time: false,
        spooling: false,
        pending: pending_tx,
    };
    let handle = tokio::spawn(writer.run(rx, shutdown));
    (Reporter { tx, pending }, handle)
}

struct Writer {
    client: Arc<ApiClient>,
    spool_dir: PathBuf,
    spool: PathBuf,
    queue: VecDeque<Report>,
    /// The largest request body to send: the API's limit, less after a 413.
    body_limit: usize,
    /// Refused as too large at the smallest body limit: one report per request.
    one_at_a_time: bool,
    /// The API failed: everything queued is in the spool file too, and what arrives is
    /// appended to it before anything else happens.
    spooling: bool,
    pending: watch::Sender<usize>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Report>, shutdown: CancellationToken) {
        self.load_spool().await;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            self.take(&mut rx).await;
            if self.queue.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    report = rx.recv() => match report {
                        Some(report) => {
                            let linger = !matches!(report, Report::Logs { .. });
                            self.accept(report).await;
                            if linger {
                                tokio::select! {
                                    _ = shutdown.cancelled() => {}
                                    _ = tokio::time::sleep(LINGER) => {}
                                }
                            }
                        }
                        None => break,
                    },
                }
                continue;
            }
            match self.deliver_head().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, queued = self.queue.len(),
                        "cannot deliver run reports; spooling and retrying");
                    self.spool_all().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        // Shutdown: a last bounded effort, then whatever is left waits in the spool.
        rx.close();
        self.take(&mut rx).await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        while !self.queue.is_empty() && tokio::time::Instant::now() < deadline {
            let attempt = tokio::time::timeout_at(deadline, self.deliver_head()).await;
            if !matches!(attempt, Ok(Ok(()))) {
                break;
            }
        }
        self.spool_all().await;
    }

    /// Everything waiting in the channel, without blocking (spooled, if it must be, in
    /// one write: log lines come in many small reports).
    async fn take(&mut self, rx: &mut mpsc::UnboundedReceiver<Report>) {
        let mut taken = Vec::new();
        while let Ok(report) = rx.try_recv() {
            taken.push(report);
        }
        if taken.is_empty() {
            return;
        }
        if self.spooling {
            self.append(&taken).await;
        }
        let limit = self.body_limit;
        self.queue
            .extend(taken.into_iter().flat_map(|r| fit(r, limit)));
        self.publish();
    }

    async fn accept(&mut self, report: Report) {
        if self.spooling {
            self.append(std::slice::from_ref(&report)).await;
        }
        self.queue.extend(fit(report, self.body_limit));
        self.publish();
    }

    fn publish(&self) {
        self.pending.send_replace(self.queue.len());
    }

    /// Delivers the head of the queue, as many reports as fit one request, and drops them
    /// from the queue (or, refused as too large, splits them for smaller requests).
    async fn deliver_head(&mut self) -> Result<(), CallError> {
        self.fit_head();
        let (taken, batch) = self.head_batch();
        if taken == 0 {
            return Ok(());
        }
        match self.client.reports(&batch).await {
            Ok(()) => {}
            Err(e) if e.too_large() => {
                let size = json_size(&batch);
                tracing::warn!(error = %e, size, reports = taken,
                    "run reports refused as too large; sending them in smaller requests");
                self.shrink(size);
                return Ok(());
            }
            Err(CallError::Refused(why)) => {
                // Never deliverable as it is (malformed): dropping it is the only way
                // forward, and the log says so.
                tracing::error!(%why, reports = taken, "run reports were refused and are dropped");
            }
            Err(e @ CallError::Unavailable(_)) => return Err(e),
        }
        self.queue.drain(..taken);
        if self.queue.is_empty() && self.spooling {
            self.clear_spool().await;
        }
        self.publish();
        Ok(())
    }

    /// The reports at the head of the queue that fit one request, and that request's
    /// reports (consecutive log reports of one run merged).
    fn head_batch(&self) -> (usize, Vec<Report>) {
        let mut lines = 0;
        let mut bytes = ENVELOPE_BYTES;
        let mut taken = 0;
        let mut batch: Vec<Report> = Vec::new();
        for report in &self.queue {
            let (n, size) = (report_lines(report), json_size(report) + 1);
            let full = lines + n > MAX_REPORT_LINES || bytes + size > self.body_limit;
            if taken > 0 && (full || self.one_at_a_time) {
                break;
            }
            lines += n;
            bytes += size;
            taken += 1;
            match (batch.last_mut(), report) {
                (
                    Some(Report::Logs { run, lines: merged }),
                    Report::Logs {
                        run: next,
                        lines: more,
                    },
                ) if run == next => merged.extend(more.iter().cloned()),
                _ => batch.push(report.clone()),
            }
        }
        (taken, batch)
    }

    /// The API refused a request of `size` bytes as too large: half that from now on; at
    /// the smallest size, one report per request, and the head split in two (or, one
    /// line too large alone, cut) each time it is refused.
    fn shrink(&mut self, size: usize) {
        let smaller = (size.min(self.body_limit) / 2).max(MIN_BODY_BYTES);
        if smaller < self.body_limit {
            self.body_limit = smaller;
            return;
        }
        if !self.one_at_a_time {
            self.one_at_a_time = true;
            return;
        }
        let pieces = match self.queue.pop_front().expect("a refused head") {
            Report::Logs { run, mut lines } if lines.len() > 1 => {
                let rest = lines.split_off(lines.len() / 2);
                vec![
                    Report::Logs { run, lines },
                    Report::Logs { run, lines: rest },
                ]
            }
            Report::Logs { run, mut lines } if lines[0].text.len() > MIN_BODY_BYTES / 8 => {
                let keep = lines[0].text.len() / 2;
                cut(&mut lines[0], keep);
                vec![Report::Logs { run, lines }]
            }
            refused => {
                tracing::error!(run = %refused.run(), limit = self.body_limit,
                    "a run report is refused as too large at the smallest size and is dropped");
                Vec::new()
            }
        };
        for piece in pieces.into_iter().rev() {
            self.queue.push_front(piece);
        }
    }

    /// Splits the head of the queue if it does not fit a request now (the limit shrank
    /// since it was queued).
    fn fit_head(&mut self) {
        let Some(head) = self.queue.front() else {
            return;
        };
        if json_size(head) + ENVELOPE_BYTES <= self.body_limit {
            return;
        }
        let head = self.queue.pop_front().expect("a head");
        for piece in fit(head, self.body_limit).into_iter().rev() {
            self.queue.push_front(piece);
        }
    }

    async fn load_spool(&mut self) {
        let Ok(text) = tokio::fs::read_to_string(&self.spool).await else {
            return;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Report>(line) {
                Ok(report) => self.queue.push_back(report),
                // A line cut short by a crash mid-write: what follows it was never written.
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable spool line"),
            }
        }
        if !self.queue.is_empty() {
            tracing::info!(
                reports = self.queue.len(),
                "delivering the spool of an earlier run"
            );
            self.spooling = true;
            self.publish();
        }
    }

    /// Rewrites the spool with the whole queue (entering spooling mode).
    async fn spool_all(&mut self) {
        if self.spooling || self.queue.is_empty() {
            return;
        }
        let reports: Vec<Report> = self.queue.iter().cloned().collect();
        self.append(&reports).await;
        self.spooling = true;
    }

    async fn append(&self, reports: &[Report]) {
        let mut text = String::new();
        for report in reports {
            text.push_str(&serde_json::to_string(report).expect("reports serialise"));
            text.push('\n');
        }
        let result = async {
            tokio::fs::create_dir_all(&self.spool_dir).await?;
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.spool)
                .await?;
            file.write_all(text.as_bytes()).await?;
            file.sync_data().await
        }
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, spool = %self.spool.display(),
                "cannot write the spool; reports stay in memory only");
        }
    }

    async fn clear_spool(&mut self) {
        match tokio::fs::remove_file(&self.spool).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the delivered spool"),
        }
        self.spooling = false;
    }
}

/// Log lines of a report (1 for anything else), as the API counts them.
fn report_lines(report: &Report) -> usize {
    match report {
        Report::Logs { lines, .. } => lines.len(),
        Report::Started { .. } | Report::Abandon { .. } | Report::Finish { .. } => 1,
    }
}

/// Bytes of `value` as JSON.
fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("reports serialise");
    count.0
}

/// `report` as reports that each fit a request of `limit` bytes and the API's line limit:
/// a log report split by lines, a line too large on its own cut.
fn fit(report: Report, limit: usize) -> Vec<Report> {
    let room = limit - ENVELOPE_BYTES;
    let Report::Logs { run, lines } = report else {
        return vec![report];
    };
    if lines.len() <= MAX_REPORT_LINES && json_size(&lines) + 64 <= room {
        return vec![Report::Logs { run, lines }];
    }
    // What a report of no lines takes, with room for the separators.
    let overhead = json_size(&Report::Logs {
        run,
        lines: Vec::new(),
    }) + 1;
    let mut pieces = Vec::new();
    let mut piece: Vec<LogLine> = Vec::new();
    let mut size = overhead;
    for mut line in lines {
        let mut line_size = json_size(&line) + 1;
        if overhead + line_size > room {
            cut(&mut line, (room - overhead) / 8);
            line_size = json_size(&line) + 1;
        }
        if !piece.is_empty() && (piece.len() == MAX_REPORT_LINES || size + line_size > room) {
            pieces.push(Report::Logs {
                run,
                lines: std::mem::take(&mut piece),
            });
            size = overhead;
        }
        size += line_size;
        piece.push(line);
    }
    if !piece.is_empty() {
        pieces.push(Report::Logs { run, lines: piece });
    }
    pieces
}

/// Cuts a line's text to about `keep` bytes (at a character boundary), with a marker
/// that says how much was cut; `keep` leaves room for JSON's escapes of what is kept.
fn cut(line: &mut LogLine, keep: usize) {
    let mut end = keep.min(line.text.len());
    while !line.text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = line.text.len() - end;
    line.text.truncate(end);
    line.text.push_str(&format!(
        " [cut by the worker: {cut} more bytes of this line did not fit a report]"
    ));
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::extract::DefaultBodyLimit;
    use axum::http::StatusCode;
    use axum::routing::post;
    use cloudtask_core::ids::RunId;
    use cloudtask_core::protocol::ReportBatch;
    use cloudtask_core::run::{LogStream, Outcome, RunStatus};

    use super::*;

    /// Requests the stand-in API took, and how many it refused as too large.
    #[derive(Default)]
    struct Taken {
        batches: Vec<Vec<Report>>,
        refused: usize,
    }

    /// A real HTTP server that takes `/worker/reports` bodies of at most `limit` bytes,
    /// as the API does (axum's body limit, 413 past it).
    async fn small_api(limit: usize) -> (String, Arc<Mutex<Taken>>) {
        let taken = Arc::new(Mutex::new(Taken::default()));
        let state = taken.clone();
        let app = axum::Router::new()
            .route(
                "/worker/reports",
                post(
                    async move |body: Result<
                        axum::Json<ReportBatch>,
                        axum::extract::rejection::JsonRejection,
                    >| {
                        match body {
                            Ok(axum::Json(batch)) => {
                                state.lock().unwrap().batches.push(batch.reports);
                                StatusCode::NO_CONTENT
                            }
                            Err(rejection) => {
                                state.lock().unwrap().refused += 1;
                                rejection.status()
                            }
                        }
                    },
                ),
            )
            .layer(DefaultBodyLimit::max(limit));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, taken)
    }

    fn line(offset: u64, text: String) -> LogLine {
        LogLine {
            offset,
            stream: LogStream::Stdout,
            at: chrono::Utc::now(),
            text,
        }
    }

    #[tokio::test]
    async fn reports_refused_as_too_large_are_split_and_delivered_in_order() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        // The worker believes the API takes MAX_REPORT_BODY_BYTES; this one takes 24 KiB.
        let (url, taken) = small_api(24 << 10).await;
        let client = Arc::new(ApiClient::new(
            &url,
            "token",
            "credential".into(),
            CancellationToken::new(),
        ));
        let spool = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (reporter, writer) = spawn(client, spool.path().to_path_buf(), shutdown.clone());
        let run = RunId::new();
        // 300 lines of 1 KiB in one report (300 KiB), then one line of 40 KiB (more than
        // the API takes in a request on its own), then the outcome.
        let lines = (0..300)
            .map(|i| line(i, format!("{i:04} {}", "x".repeat(1019))))
            .collect();
        reporter.send(Report::Logs { run, lines });
        let huge = format!("{}\0{}", "y".repeat(20_000), "z".repeat(20_000));
        reporter.send(Report::Logs {
            run,
            lines: vec![line(300, huge)],
        });
        let outcome = Outcome {
            status: RunStatus::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            finished_at: chrono::Utc::now(),
            reason: None,
        };
        reporter.send(Report::Finish { run, outcome });

        let finished = |t: &Taken| {
            t.batches
                .iter()
                .flatten()
                .any(|r| matches!(r, Report::Finish { .. }))
        };
        let delivered = async {
            while !finished(&taken.lock().unwrap()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), delivered)
            .await
            .expect("every report delivered in time");
        shutdown.cancel();
        writer.await.unwrap();

        let taken = taken.lock().unwrap();
        assert!(
            taken.refused > 0,
            "the API refused nothing: the test tests nothing"
        );
        let reports: Vec<&Report> = taken.batches.iter().flatten().collect();
        let lines: Vec<&LogLine> = reports
            .iter()
            .filter_map(|r| match r {
                Report::Logs { lines, .. } => Some(lines),
                _ => None,
            })
            .flatten()
            .collect();
        let offsets: Vec<u64> = lines.iter().map(|l| l.offset).collect();
        assert_eq!(
            offsets,
            (0..=300).collect::<Vec<u64>>(),
            "each line once, in order"
        );
        assert!(
            matches!(reports.last(), Some(Report::Finish { .. })),
            "the outcome last"
        );
        for (i, l) in lines[..300].iter().enumerate() {
            assert_eq!(l.text, format!("{i:04} {}", "x".repeat(1019)));
        }
        // The line too large alone: cut, and the cut said.
        let last = &lines[300].text;
        assert!(last.starts_with("yyyy"), "{}", &last[..40]);
        assert!(last.len() < 24 << 10);
        assert!(
            last.ends_with("more bytes of this line did not fit a report]"),
            "{}",
            &last[last.len() - 80..]
        );
        for batch in &taken.batches {
            assert!(
                json_size(&ReportBatch {
                    reports: batch.clone()
                }) <= 24 << 10
            );
        }
    }

    #[test]
    fn a_report_too_large_for_one_request_is_split_to_fit() {
        let run = RunId::new();
        let lines: Vec<LogLine> = (0..12_000).map(|i| line(i, "\0".repeat(50))).collect();
        let pieces = fit(Report::Logs { run, lines }, 64 << 10);
        let mut next = 0;
        for piece in &pieces {
            let Report::Logs { lines, .. } = piece else {
                panic!("only log reports")
            };
            assert!(lines.len() <= MAX_REPORT_LINES);
            assert!(json_size(piece) + ENVELOPE_BYTES <= 64 << 10);
            for l in lines {
                assert_eq!(l.offset, next);
                next += 1;
            }
        }
        assert_eq!(next, 12_000);
    }
}
