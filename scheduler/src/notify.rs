//! Delivering the notification outbox, on the leader only. Each pass leases the due
//! deliveries (the lease keeps any other sender off them: a new leader takes over what a
//! dead one left once its lease runs out), sends, and marks them sent; what fails is
//! retried with exponential backoff and jitter. A task's failures are grouped: after one
//! mail about a task, its further failures within the digest window wait for the window
//! to end and go out together as one digest.
//!
//! Exactly once, as far as SMTP allows: a delivery is marked sent only after the server
//! accepted it, and a crash in between (after the server's "250", before the mark) is the
//! one window where a mail could go twice; every mail carries a Message-ID made from its
//! outbox row, so receivers can tell a repeat.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_catalogue::Catalogue;
use cloudtask_catalogue::notifications::{
    Channel, Notification, RUN_FAILED, WORKER_OFFLINE, WORKER_ONLINE,
};
use cloudtask_core::config::Config;
use cloudtask_core::ids::RunId;
use hmac::{Hmac, Mac};
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outbound::WebhookClient;

/// How often the leader looks for due deliveries.
const POLL: Duration = Duration::from_secs(1);
/// Deliveries leased at once (a storm of one task's failures up to this many makes one
/// digest).
const BATCH: u64 = 500;
/// Log lines quoted in a failure mail.
const LAST_LINES: u64 = 10;
/// Longest wait between two attempts of one delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    catalogue: Catalogue,
    mailer: Option<AsyncSmtpTransport<Tokio1Executor>>,
    from: Mailbox,
    webhooks: WebhookClient,
    public_url: String,
    digest_window: chrono::Duration,
    /// One send (an SMTP conversation, a webhook POST) at most.
    send_timeout: Duration,
}

/// A configuration the notifier cannot work with.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct NotifierConfigError {
    pub key: &'static str,
    pub message: String,
}

impl Notifier {
    pub fn new(catalogue: Catalogue, config: &Config) -> Result<Notifier, NotifierConfigError> {
        let send_timeout = Duration::from_secs(config.smtp_timeout_secs);
        let mailer = match &config.smtp_url {
            None => None,
            Some(url) => Some(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| NotifierConfigError {
                        key: "smtp_url",
                        message: e.to_string(),
                    })?
                    .timeout(Some(send_timeout))
                    .build(),
            ),
        };
        let from = config
            .smtp_from
            .parse::<Mailbox>()
            .map_err(|e| NotifierConfigError {
                key: "smtp_from",
                message: e.to_string(),
            })?;
        let webhooks = WebhookClient::new(config.outbound_policy(), send_timeout).map_err(|e| {
            NotifierConfigError {
                key: "smtp_timeout_secs",
                message: e.to_string(),
            }
        })?;
        Ok(Notifier {
            inner: Arc::new(Inner {
                catalogue,
                mailer,
                from,
                webhooks,
                public_url: config.public_url.trim_end_matches('/').to_owned(),
                digest_window: chrono::Duration::seconds(config.notify_digest_window_secs as i64),
                send_timeout,
            }),
        })
    }

    /// Delivers until `stop` (the end of the leadership term).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            match self.deliver_due(&stop).await {
                Ok(0) => {}
                Ok(sent) => tracing::debug!(sent, "notifications delivered"),
                Err(e) => tracing::warn!(error = %e, "notification pass failed; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// One pass over what is due; returns how many deliveries went out.
    pub async fn deliver_due(&self, stop: &CancellationToken) -> anyhow::Result<usize> {
        let inner = &self.inner;
        let mut channels = vec![Channel::Webhook];
        if inner.mailer.is_some() {
            channels.push(Channel::Email);
        }
        // The lease covers the whole batch; sending stops (and the rest is handed back)
        // when what is left of it could not cover one more send.
        let lease = inner.send_timeout * 4 + Duration::from_secs(30);
        let leased = inner
            .catalogue
            .lease_notifications(BATCH, lease, &channels)
            .await?;
        if leased.is_empty() {
            return Ok(0);
        }
        let deadline = tokio::time::Instant::now() + lease - inner.send_timeout * 2;
        let mut sent = 0;
        let mut pending = plan(leased);
        while let Some(delivery) = pending.first() {
            if stop.is_cancelled() || tokio::time::Instant::now() > deadline {
                break;
            }
            let ids: Vec<Uuid> = delivery.items().iter().map(|n| n.id).collect();
            match self.deliver(delivery).await {
                Ok(Outcome::Sent) => {
                    inner.catalogue.notifications_sent(&ids).await?;
                    sent += ids.len();
                }
                Ok(Outcome::HeldUntil(until)) => {
                    inner
                        .catalogue
                        .notifications_later(&ids, until, None)
                        .await?;
                }
                Err(e) => {
                    let attempts = delivery.items().iter().map(|n| n.attempts).max();
                    let retry_at = Utc::now() + backoff(attempts.unwrap_or(1));
                    tracing::warn!(error = %e, deliveries = ids.len(), %retry_at,
                        "notification not delivered; will retry");
                    inner
                        .catalogue
                        .notifications_later(&ids, retry_at, Some(&e.to_string()))
                        .await?;
                }
            }
            pending.remove(0);
        }
        // Handed back untouched: due again at once, and the lease is not an attempt.
        let rest: Vec<Uuid> = pending
            .iter()
            .flat_map(|d| d.items().iter().map(|n| n.id))
            .collect();
        if !rest.is_empty() {
            inner
                .catalogue
                .notifications_later(&rest, Utc::now(), None)
                .await?;
        }
        Ok(sent)
    }

    async fn deliver(&self, delivery: &Delivery) -> anyhow::Result<Outcome> {
        match delivery {
            Delivery::Webhook(notification) => self.post_webhook(notification).await,
            Delivery::Mail(notification) => {
                let recipients = recipients(&notification.payload);
                if recipients.is_empty() {
                    return Ok(Outcome::Sent); // nobody to tell: done
                }
                let (subject, body) = self.compose(notification).await?;
                self.send_mail(&recipients, &subject, body, &notification.id.to_string())
                    .await
            }
            Delivery::Failures { group, items } => {
                if let Some(last) = self.inner.catalogue.last_mail_of_group(group).await? {
                    let open_until = last + self.inner.digest_window;
                    if Utc::now() < open_until {
                        return Ok(Outcome::HeldUntil(open_until));
                    }
                }
                let recipients = recipients(&items[0].payload);
                let (subject, body) = if items.len() == 1 {
                    self.compose(&items[0]).await?
                } else {
                    self.compose_digest(items)
                };
                let id = format!("{}-{}", items[0].id, items.len());
                self.send_mail(&recipients, &subject, body, &id).await
            }
        }
    }

    async fn send_mail(
        &self,
        recipients: &[String],
        subject: &str,
        body: String,
        id: &str,
    ) -> anyhow::Result<Outcome> {
        let Some(mailer) = &self.inner.mailer else {
            anyhow::bail!("no SMTP server configured");
        };
        let mut builder = Message::builder()
            .from(self.inner.from.clone())
            .subject(subject)
            .message_id(Some(format!("<{id}@cloudtask>")))
            .header(ContentType::TEXT_PLAIN);
        for recipient in recipients {
            builder = builder.to(recipient.parse()?);
        }
        let message = builder.body(body)?;
        mailer.send(message).await?;
        Ok(Outcome::Sent)
    }

    async fn post_webhook(&self, notification: &Notification) -> anyhow::Result<Outcome> {
        let Some(tenant) = notification.tenant_id else {
            return Ok(Outcome::Sent);
        };
        let settings = self.inner.catalogue.tenant_notifications(tenant).await?;
        let (Some(url), Some(secret)) = (settings.webhook_url, settings.webhook_secret) else {
            return Ok(Outcome::Sent); // the webhook was turned off since
        };
        let mut data = notification.payload.clone();
        if let Some(object) = data.as_object_mut() {
            object.remove("recipients");
        }
        let body = serde_json::to_vec(&json!({
            "id": notification.id,
            "kind": notification.kind,
            "createdAt": notification.created_at,
            "data": data,
        }))?;
        let response = self
            .inner
            .webhooks
            .post(&url)?
            .header("content-type", "application/json")
            .header("x-cloudtask-event", &notification.kind)
            .header("x-cloudtask-delivery", notification.id.to_string())
            .header("x-cloudtask-signature", signature(secret.as_bytes(), &body))
            .body(body)
            .send()
            .await?;
        if !response.status().is_success() {
            anyhow::bail!("webhook answered {}", response.status());
        }
        Ok(Outcome::Sent)
    }

    /// Subject and body of one event's mail.
    async fn compose(&self, n: &Notification) -> anyhow::Result<(String, String)> {
        let p = &n.payload;
        let cluster = text(p, "clusterName");
        let worker = text(p, "worker");
        Ok(match n.kind.as_str() {
            RUN_FAILED => {
                let run: RunId = text(p, "run").parse()?;
                let lines = self.inner.catalogue.last_log_lines(run, LAST_LINES).await?;
                let mut body = format!(
                    "Task:       {}\nCluster:    {cluster}\nWorker:     {worker}\n\
                     Scheduled:  {}\nStatus:     {}\nReason:     {}\nAttempt:    {}\n\
                     Exit code:  {}\nSignal:     {}\nError:      {}\n\nLast log lines:\n",
                    text(p, "taskName"),
                    text(p, "scheduledAt"),
                    text(p, "status"),
                    text(p, "reason"),
                    text(p, "attempt"),
                    text(p, "exitCode"),
                    text(p, "signal"),
                    text(p, "error"),
                );
                if lines.is_empty() {
                    body.push_str("  (none)\n");
                }
                for line in lines {
                    body.push_str(&format!("  [{}] {}\n", line.offset, line.text));
                }
                body.push_str(&format!("\nOpen the run: {}\n", self.run_link(p)));
                let subject = format!(
                    "[CloudTask] {} {} on {cluster}",
                    text(p, "taskName"),
                    text(p, "status")
                );
                (subject, body)
            }
            WORKER_OFFLINE => (
                format!("[CloudTask] worker {worker} is offline ({cluster})"),
                format!(
                    "Worker {worker} of cluster {cluster} lost its session at {} without \
                     leaving. Its tasks moved to the cluster's other workers; runs it had \
                     going were marked LOST.\n\nCluster: {}/clusters/{}\n",
                    text(p, "at"),
                    self.inner.public_url,
                    text(p, "cluster"),
                ),
            ),
            WORKER_ONLINE => (
                format!("[CloudTask] worker {worker} is back online ({cluster})"),
                format!(
                    "Worker {worker} of cluster {cluster} is back since {}.\n\nCluster: {}/clusters/{}\n",
                    text(p, "at"),
                    self.inner.public_url,
                    text(p, "cluster"),
                ),
            ),
            other => (
                format!("[CloudTask] {other}"),
                serde_json::to_string_pretty(p)?,
            ),
        })
    }

    /// One mail for several failures of one task.
    fn compose_digest(&self, items: &[Notification]) -> (String, String) {
        let p = &items[0].payload;
        let task = text(p, "taskName");
        let cluster = text(p, "clusterName");
        let mut body = format!(
            "Task {task} on cluster {cluster} failed {} times since the last mail:\n\n",
            items.len()
        );
        for n in items {
            let p = &n.payload;
            body.push_str(&format!(
                "  {}  {:<9}  {:<13}  exit {:<4}  worker {}  {}\n",
                text(p, "scheduledAt"),
                text(p, "status"),
                text(p, "reason"),
                text(p, "exitCode"),
                text(p, "worker"),
                self.run_link(p),
            ));
        }
        (
            format!("[CloudTask] {task}: {} failures on {cluster}", items.len()),
            body,
        )
    }

    fn run_link(&self, payload: &Value) -> String {
        format!("{}/runs/{}", self.inner.public_url, text(payload, "run"))
    }
}

/// What became of one delivery.
enum Outcome {
    Sent,
    /// Held back until then (a digest window is open).
    HeldUntil(DateTime<Utc>),
}

/// One thing to send: a webhook POST, a mail about one event, or one mail about one or
/// more failures of a task (to the same recipients).
enum Delivery {
    Webhook(Notification),
    Mail(Notification),
    Failures {
        group: String,
        items: Vec<Notification>,
    },
}

impl Delivery {
    fn items(&self) -> &[Notification] {
        match self {
            Delivery::Webhook(n) | Delivery::Mail(n) => std::slice::from_ref(n),
            Delivery::Failures { items, .. } => items,
        }
    }
}

/// Groups a leased batch into deliveries, oldest first.
fn plan(leased: Vec<Notification>) -> Vec<Delivery> {
    let mut deliveries: Vec<Delivery> = Vec::new();
    for n in leased {
        match (n.channel, n.kind.as_str(), n.group_key.clone()) {
            (Channel::Webhook, _, _) => deliveries.push(Delivery::Webhook(n)),
            (Channel::Email, RUN_FAILED, Some(group)) => {
                let same = deliveries.iter_mut().find_map(|d| match d {
                    Delivery::Failures { group: g, items }
                        if *g == group
                            && recipients(&items[0].payload) == recipients(&n.payload) =>
                    {
                        Some(items)
                    }
                    _ => None,
                });
                match same {
                    Some(items) => items.push(n),
                    None => deliveries.push(Delivery::Failures {
                        group,
                        items: vec![n],
                    }),
                }
            }
            (Channel::Email, _, _) => deliveries.push(Delivery::Mail(n)),
        }
    }
    deliveries
}

fn recipients(payload: &Value) -> Vec<String> {
    payload["recipients"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A payload field as text; "-" when absent.
fn text(payload: &Value, key: &str) -> String {
    match &payload[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `sha256=<hex HMAC-SHA256 of the body>`, as the `X-CloudTask-Signature` header.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `attempts + 1`: 1 s, 2 s, 4 s… up to ten minutes, ±20 %.
fn backoff(attempts: u32) -> chrono::Duration {
    let base = Duration::from_secs(1u64 << attempts.saturating_sub(1).min(20)).min(MAX_BACKOFF);
    let jitter = rand::random_range(0.8..1.2);
    chrono::Duration::from_std(base.mul_f64(jitter)).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(task: &str, recipients: &[&str]) -> Notification {
        Notification {
            id: Uuid::now_v7(),
            tenant_id: None,
            kind: RUN_FAILED.into(),
            channel: Channel::Email,
            payload: json!({ "recipients": recipients }),
            attempts: 1,
            group_key: Some(format!("task:{task}")),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn failures_of_one_task_to_the_same_people_make_one_delivery() {
        let mut webhook = failure("a", &[]);
        webhook.channel = Channel::Webhook;
        let plan = plan(vec![
            failure("a", &["ops@x.example"]),
            failure("b", &["ops@x.example"]),
            webhook,
            failure("a", &["ops@x.example"]),
            failure("a", &["dev@x.example"]),
        ]);
        let shape: Vec<(&str, usize)> = plan
            .iter()
            .map(|d| match d {
                Delivery::Webhook(_) => ("webhook", 1),
                Delivery::Mail(_) => ("mail", 1),
                Delivery::Failures { items, .. } => ("failures", items.len()),
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("failures", 2),
                ("failures", 1),
                ("webhook", 1),
                ("failures", 1)
            ]
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        for (attempts, secs) in [(1, 1.0), (2, 2.0), (5, 16.0), (30, 600.0)] {
            let wait = backoff(attempts).num_milliseconds() as f64 / 1000.0;
            assert!(
                wait >= secs * 0.8 && wait <= secs * 1.2,
                "{attempts}: {wait}"
            );
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
