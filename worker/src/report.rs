//! The one writer of run results: every log batch and outcome goes through here, in
//! order, to the API. What the API cannot take now is written to an on-disk spool under
//! the data folder and delivered when it is back, in the same order; a spool left by an
//! earlier process is delivered first. Ingest is idempotent (log lines by run and offset,
//! outcomes only onto unfinished runs), so a report delivered twice lands once.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::{ApiClient, CallError};

/// Lines per delivered batch, and bytes (well under the API's body limit).
const BATCH_LINES: usize = 2_000;
const BATCH_BYTES: usize = 512 << 10;
/// How long a report waits for others before it leaves, when the writer was idle: the
/// starts and outcomes of runs fired together travel in one request, sent after their
/// processes have started rather than while they start.
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
                            self.accept(report).await;
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = tokio::time::sleep(LINGER) => {}
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

    /// Everything waiting in the channel, without blocking.
    async fn take(&mut self, rx: &mut mpsc::UnboundedReceiver<Report>) {
        while let Ok(report) = rx.try_recv() {
            self.accept(report).await;
        }
    }

    async fn accept(&mut self, report: Report) {
        if self.spooling {
            self.append(std::slice::from_ref(&report)).await;
        }
        self.queue.push_back(report);
        self.publish();
    }

    fn publish(&self) {
        self.pending.send_replace(self.queue.len());
    }

    /// Delivers the head of the queue, as many reports as fit one batch, and drops them
    /// from the queue.
    async fn deliver_head(&mut self) -> Result<(), CallError> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let mut lines = 0;
        let mut bytes = 0;
        let mut taken = 0;
        for report in &self.queue {
            let (n, size) = match report {
                Report::Logs { lines, .. } => (
                    lines.len(),
                    lines.iter().map(|l| l.text.len() + 64).sum::<usize>(),
                ),
                Report::Started { .. } | Report::Abandon { .. } | Report::Finish { .. } => (1, 128),
            };
            if taken > 0 && (lines + n > BATCH_LINES || bytes + size > BATCH_BYTES) {
                break;
            }
            lines += n;
            bytes += size;
            taken += 1;
        }
        let batch: Vec<Report> = self.queue.iter().take(taken).cloned().collect();
        match self.client.reports(&batch).await {
            Ok(()) => {}
            Err(CallError::Refused(why)) => {
                // Never deliverable as it is (malformed, too large): dropping it is the
                // only way forward, and the log says so.
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
