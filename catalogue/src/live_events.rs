//! Live events for subscribers: log lines stored, run status changed, worker joined or
//! left. They say *that* something changed (ids and offsets, never content), and the
//! subscriber reads what changed from the catalogue, so an event that is missed or comes
//! twice costs a query, never a gap or a duplicate.
//!
//! On Postgres an event is a `NOTIFY` on `cloudtask_events`. Log batches notify inside
//! their own transaction (the event leaves with the commit, no extra round trip: live
//! subscribers wait on it). Everything else, claims above all, is announced once its
//! transaction has committed, by one announcer per process that batches what many
//! writers committed into one statement: notifying commits queue behind one lock in
//! Postgres, and a claim must not wait for other claims' fsyncs. Every API replica keeps
//! one LISTEN connection and fans out in memory. On SQLite (standalone: one process) the event goes
//! straight to the in-memory fan-out after the commit. Payloads are a few ids, far below
//! Postgres's 8,000 bytes. An event lost with a crash between commit and NOTIFY is
//! covered by the subscribers' periodic re-read.
//!
//! The fan-out is a bounded broadcast: a subscriber that falls behind is told it lagged
//! and resumes from what the catalogue holds, and the writer never waits for anyone.

use std::str::FromStr;
use std::sync::Arc;

use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId, UserId, WorkerId};
use cloudtask_core::{Error, Result};
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use tokio::sync::{OnceCell, broadcast, mpsc};

pub const CHANNEL: &str = "cloudtask_events";

/// Events buffered per subscriber before it is told it lagged.
const FAN_OUT_CAPACITY: usize = 4_096;

/// How a worker's membership changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Joined,
    /// Left cleanly (shut down).
    Left,
    /// Its session ended without a clean leave.
    Offline,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Joined => "JOINED",
            Membership::Left => "LEFT",
            Membership::Offline => "OFFLINE",
        }
    }
}

impl FromStr for Membership {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Ok(match s {
            "JOINED" => Membership::Joined,
            "LEFT" => Membership::Left,
            "OFFLINE" => Membership::Offline,
            _ => return Err(()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Lines of the run are stored up to (not including) offset `next`.
    Logs { run: RunId, next: u64 },
    /// A run was created or changed status.
    Run {
        tenant: TenantId,
        task: TaskId,
        run: RunId,
    },
    Worker {
        tenant: TenantId,
        cluster: ClusterId,
        change: Membership,
        worker: WorkerId,
    },
    /// A user's memberships or logins changed (role change, removal, logout): their
    /// open sockets check their session now, on every replica.
    Account { user: UserId },
    /// Events may have been missed (the subscriber lagged, or the LISTEN connection was
    /// lost): re-read what you follow.
    Resync,
}

impl Event {
    fn encode(&self) -> Option<String> {
        Some(match self {
            Event::Logs { run, next } => format!("L {run} {next}"),
            Event::Run { tenant, task, run } => format!("R {tenant} {task} {run}"),
            Event::Worker {
                tenant,
                cluster,
                change,
                worker,
            } => format!("W {tenant} {cluster} {} {worker}", change.as_str()),
            Event::Account { user } => format!("A {user}"),
            Event::Resync => return None,
        })
    }

    fn decode(text: &str) -> Option<Event> {
        let mut parts = text.splitn(5, ' ');
        let kind = parts.next()?;
        let mut next = || parts.next();
        Some(match kind {
            "L" => Event::Logs {
                run: next()?.parse().ok()?,
                next: next()?.parse().ok()?,
            },
            "R" => Event::Run {
                tenant: next()?.parse().ok()?,
                task: next()?.parse().ok()?,
                run: next()?.parse().ok()?,
            },
            "W" => Event::Worker {
                tenant: next()?.parse().ok()?,
                cluster: next()?.parse().ok()?,
                change: next()?.parse().ok()?,
                worker: next()?.parse().ok()?,
            },
            "A" => Event::Account {
                user: next()?.parse().ok()?,
            },
            _ => return None,
        })
    }
}

/// Most events one NOTIFY statement carries.
const ANNOUNCE_BATCH: usize = 1_000;

/// The in-memory fan-out and the announcer, shared by every clone of a catalogue.
#[derive(Debug)]
pub(crate) struct Hub {
    tx: broadcast::Sender<Event>,
    /// The LISTEN connection (Postgres), started by the first subscriber.
    listener: OnceCell<tokio::task::JoinHandle<()>>,
    /// Committed events on their way to NOTIFY (Postgres), started by the first one.
    announcer: std::sync::OnceLock<mpsc::UnboundedSender<String>>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            tx: broadcast::channel(FAN_OUT_CAPACITY).0,
            listener: OnceCell::new(),
            announcer: std::sync::OnceLock::new(),
        })
    }

    fn announce(&self, db: &DatabaseConnection, events: Vec<Event>) {
        if db.get_database_backend() != DatabaseBackend::Postgres {
            for event in events {
                let _ = self.tx.send(event);
            }
            return;
        }
        let announcer = self.announcer.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(announce(db.clone(), rx));
            tx
        });
        for payload in events.iter().filter_map(Event::encode) {
            let _ = announcer.send(payload);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

/// NOTIFYs what is queued, everything pending at once in one statement. Ends when the
/// catalogue is gone.
async fn announce(db: DatabaseConnection, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut payloads = Vec::new();
    while rx.recv_many(&mut payloads, ANNOUNCE_BATCH).await > 0 {
        let statement = notify_statement(std::mem::take(&mut payloads));
        if let Err(e) = db.execute_raw(statement).await {
            // Subscribers re-read on their own from time to time; nothing is lost.
            tracing::warn!(error = %e, "events not announced");
        }
    }
}

/// Events of one writing transaction, published once it has committed.
#[derive(Debug, Default)]
#[must_use = "publish the events after the commit"]
pub(crate) struct Outgoing {
    events: Vec<Event>,
    /// NOTIFYed inside the transaction already (Postgres).
    notified: bool,
}

impl Outgoing {
    pub(crate) fn add(&mut self, event: Event) {
        self.events.push(event);
    }

    /// NOTIFYs the events inside `conn`'s transaction, so they go out with its commit at
    /// no extra round trip: for log batches, where subscribers wait on them. (Claims are
    /// announced after their commit instead: notifying commits queue behind one lock.)
    pub(crate) async fn notify_within(
        &mut self,
        conn: &impl ConnectionTrait,
    ) -> crate::error::DbResult<()> {
        if conn.get_database_backend() != DatabaseBackend::Postgres || self.events.is_empty() {
            return Ok(());
        }
        conn.execute_raw(notify_statement(
            self.events.iter().filter_map(Event::encode).collect(),
        ))
        .await?;
        self.notified = true;
        Ok(())
    }

    /// After the commit: to this process's subscribers (SQLite), or to every replica's
    /// through NOTIFY (Postgres) unless that went with the commit.
    pub(crate) fn publish(self, db: &DatabaseConnection, hub: &Hub) {
        if !self.notified {
            hub.announce(db, self.events);
        }
    }
}

/// One statement that NOTIFYs every payload.
fn notify_statement(payloads: Vec<String>) -> Statement {
    Statement::from_sql_and_values(
        DatabaseBackend::Postgres,
        "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
        [
            CHANNEL.into(),
            sea_orm::Value::Array(
                sea_orm::sea_query::ArrayType::String,
                Some(Box::new(
                    payloads
                        .into_iter()
                        .map(|p| sea_orm::Value::String(Some(p)))
                        .collect(),
                )),
            ),
        ],
    )
}

/// A subscriber's stream of events.
pub struct Events {
    rx: broadcast::Receiver<Event>,
}

impl Events {
    /// The next event; `Resync` when some were missed. `None` once the catalogue is gone.
    pub async fn next(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Event::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl crate::Catalogue {
    /// Follows the catalogue's events from now on.
    pub async fn events(&self) -> Result<Events> {
        // Subscribe before the listener starts, so nothing it hears is missed.
        let rx = self.hub.tx.subscribe();
        if self.backend() == DatabaseBackend::Postgres {
            let pool = self.db.get_postgres_connection_pool().clone();
            let tx = self.hub.tx.clone();
            self.hub
                .listener
                .get_or_try_init(|| async move {
                    let listener = crate::mirror_changes::listen(&pool, CHANNEL).await?;
                    Ok::<_, Error>(tokio::spawn(forward(listener, tx)))
                })
                .await?;
        }
        Ok(Events { rx })
    }

    /// Publishes an event outside any other write (a worker's membership change).
    pub fn announce(&self, event: Event) {
        self.hub.announce(&self.db, vec![event]);
    }
}

/// Forwards what the LISTEN connection hears. Once a lost connection is back, every
/// subscriber is told to resync.
async fn forward(mut listener: PgListener, tx: broadcast::Sender<Event>) {
    loop {
        let event = match crate::mirror_changes::heard(&mut listener, "event").await {
            Some(payload) => match Event::decode(&payload) {
                Some(event) => event,
                None => {
                    tracing::warn!(%payload, "ignoring a bad event");
                    continue;
                }
            },
            None => Event::Resync,
        };
        let _ = tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_payload() {
        let run = RunId::from(uuid::Uuid::now_v7());
        let tenant = TenantId::from(uuid::Uuid::now_v7());
        let task = TaskId::from(uuid::Uuid::now_v7());
        let cluster = ClusterId::from(uuid::Uuid::now_v7());
        for event in [
            Event::Logs { run, next: 42 },
            Event::Run { tenant, task, run },
            Event::Worker {
                tenant,
                cluster,
                change: Membership::Offline,
                worker: "host-a.1".parse().unwrap(),
            },
            Event::Account {
                user: cloudtask_core::ids::UserId::new(),
            },
        ] {
            let payload = event.encode().unwrap();
            assert!(payload.len() < 8_000);
            assert_eq!(Event::decode(&payload), Some(event));
        }
        assert_eq!(Event::decode("X 1"), None);
        assert_eq!(Event::decode("L not-a-run 1"), None);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_to_resync_and_the_writer_never_waits() {
        let hub = Hub::new();
        let mut slow = Events {
            rx: hub.tx.subscribe(),
        };
        let run = RunId::from(uuid::Uuid::now_v7());
        // Far more than the buffer holds, with nobody reading: sending never blocks.
        for next in 0..(FAN_OUT_CAPACITY as u64 * 3) {
            let _ = hub.tx.send(Event::Logs { run, next });
        }
        assert_eq!(slow.next().await, Some(Event::Resync));
        // Then it goes on with the newest events it still holds.
        assert!(matches!(slow.next().await, Some(Event::Logs { .. })));
    }
}
