//! The notification outbox. An event the operators hear about (a run failed, timed out or
//! was lost; a worker went offline or came back) is written here in the same transaction
//! that records it, one row per channel (mail, webhook), under a unique key so the same
//! event is never queued twice. The scheduler leader delivers: it leases due rows, sends,
//! and marks them sent; a row whose sender died is leased again once its lease runs out.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId};
use cloudtask_core::roles::Action;
use cloudtask_core::run::RunStatus;
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::entities::{cluster, outbox, run, task, tenant};
use crate::error::DbResult;
use crate::{Catalogue, TenantHandle, decode_spec, now};

pub const RUN_FAILED: &str = "RUN_FAILED";
pub const WORKER_OFFLINE: &str = "WORKER_OFFLINE";
pub const WORKER_ONLINE: &str = "WORKER_ONLINE";

/// Where a notification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
        }
    }
}

/// A tenant's notification settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantNotifications {
    /// Recipients of every event, besides a task's own `notifyEmails`.
    pub emails: Vec<String>,
    pub webhook_url: Option<String>,
    /// The HMAC key webhook deliveries are signed with; never read back through the API.
    pub webhook_secret: Option<String>,
}

/// One queued delivery, as the sender sees it.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: Uuid,
    pub tenant_id: Option<TenantId>,
    pub kind: String,
    pub channel: Channel,
    /// What happened, with the recipients (mail) resolved when it was recorded.
    pub payload: Value,
    /// Deliveries tried so far, this one included.
    pub attempts: u32,
    /// Events of one group (a task's failures) are grouped into digests.
    pub group_key: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<outbox::Model> for Notification {
    type Error = Error;
    fn try_from(m: outbox::Model) -> Result<Self> {
        let channel = match m.channel.as_str() {
            "email" => Channel::Email,
            "webhook" => Channel::Webhook,
            other => return Err(Error::internal(format!("unknown channel {other}"))),
        };
        Ok(Notification {
            id: m.id,
            tenant_id: m.tenant_id.map(Into::into),
            kind: m.kind,
            channel,
            payload: m.payload,
            attempts: u32::try_from(m.attempts).unwrap_or(0),
            group_key: m.group_key,
            created_at: m.created_at,
        })
    }
}

fn emails_of(value: Option<Value>) -> Vec<String> {
    value
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// Queues an event on every channel the tenant has: mail when there is someone to tell
/// (always for worker events, which also serve as the membership history), the webhook
/// when one is set. `dedup` names the event; the same event is queued once. Returns
/// whether it was new.
pub(crate) async fn enqueue(
    conn: &impl ConnectionTrait,
    tenant_id: TenantId,
    kind: &str,
    dedup: &str,
    mut payload: Value,
    task_emails: &[String],
    group_key: Option<String>,
) -> DbResult<bool> {
    let tenant = tenant::Entity::find_by_id(Uuid::from(tenant_id))
        .one(conn)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    let mut recipients: Vec<String> = task_emails.to_vec();
    for email in emails_of(tenant.notify_emails) {
        if !recipients.contains(&email) {
            recipients.push(email);
        }
    }
    payload["recipients"] = json!(recipients);
    let mut channels = Vec::new();
    if !recipients.is_empty() || kind != RUN_FAILED {
        channels.push(Channel::Email);
    }
    if tenant.webhook_url.is_some() {
        channels.push(Channel::Webhook);
    }
    let now = now();
    let mut fresh = false;
    for channel in channels {
        let inserted = outbox::Entity::insert(outbox::ActiveModel {
            id: Set(Uuid::now_v7()),
            tenant_id: Set(Some(tenant_id.into())),
            kind: Set(kind.into()),
            dedup_key: Set(format!("{dedup}:{}", channel.as_str())),
            payload: Set(payload.clone()),
            attempts: Set(0),
            next_attempt_at: Set(now),
            sent_at: Set(None),
            last_error: Set(None),
            created_at: Set(now),
            channel: Set(channel.as_str().into()),
            group_key: Set(group_key.clone()),
            locked_until: Set(None),
        })
        .on_conflict_do_nothing_on([outbox::Column::DedupKey])
        .exec_without_returning(conn)
        .await?;
        fresh |= matches!(inserted, sea_orm::TryInsertResult::Inserted(n) if n > 0);
    }
    Ok(fresh)
}

/// A run that ended badly is an event: FAILED, TIMED_OUT or LOST. Called in the
/// transaction that records the outcome.
pub(crate) async fn run_ended(conn: &impl ConnectionTrait, row: &run::Model) -> DbResult<()> {
    let Some(status) = RunStatus::parse(&row.status) else {
        return Ok(());
    };
    if !matches!(
        status,
        RunStatus::Failed | RunStatus::TimedOut | RunStatus::Lost
    ) {
        return Ok(());
    }
    let Some(task) = task::Entity::find_by_id(row.task_id).one(conn).await? else {
        return Ok(());
    };
    let spec = decode_spec(task.spec.clone())?;
    let cluster_name = cluster::Entity::find_by_id(row.cluster_id)
        .one(conn)
        .await?
        .map(|c| c.name)
        .unwrap_or_default();
    let payload = json!({
        "run": RunId::from(row.id),
        "task": TaskId::from(row.task_id),
        "taskName": task.name,
        "cluster": ClusterId::from(row.cluster_id),
        "clusterName": cluster_name,
        "worker": row.worker_id,
        "scheduledAt": row.scheduled_at,
        "finishedAt": row.finished_at,
        "status": status.as_str(),
        "attempt": row.attempt,
        "exitCode": row.exit_code,
        "signal": row.signal,
        "error": row.error,
        "reason": row.reason,
    });
    enqueue(
        conn,
        row.tenant_id.into(),
        RUN_FAILED,
        &format!("{RUN_FAILED}:{}", row.id),
        payload,
        &spec.notify_emails,
        Some(format!("task:{}", TaskId::from(row.task_id))),
    )
    .await?;
    Ok(())
}

impl Catalogue {
    /// Leases up to `limit` due deliveries for `lease`: until it runs out no other sender
    /// takes them. Each lease counts as an attempt.
    pub async fn lease_notifications(
        &self,
        limit: u64,
        lease: std::time::Duration,
        channels: &[Channel],
    ) -> Result<Vec<Notification>> {
        let now = now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let rows = self
            .in_transaction(async |txn| {
                let mut query = outbox::Entity::find()
                    .filter(outbox::Column::SentAt.is_null())
                    .filter(outbox::Column::NextAttemptAt.lte(now))
                    .filter(outbox::Column::Channel.is_in(channels.iter().map(|c| c.as_str())))
                    .filter(
                        sea_orm::Condition::any()
                            .add(outbox::Column::LockedUntil.is_null())
                            .add(outbox::Column::LockedUntil.lt(now)),
                    )
                    .order_by_asc(outbox::Column::Id)
                    .limit(limit);
                if self.backend() == DatabaseBackend::Postgres {
                    query = query.lock_with_behavior(
                        sea_orm::sea_query::LockType::Update,
                        sea_orm::sea_query::LockBehavior::SkipLocked,
                    );
                }
                let rows = query.all(txn).await?;
                if !rows.is_empty() {
                    outbox::Entity::update_many()
                        .col_expr(outbox::Column::LockedUntil, Expr::value(until))
                        .col_expr(
                            outbox::Column::Attempts,
                            Expr::col(outbox::Column::Attempts).add(1),
                        )
                        .filter(outbox::Column::Id.is_in(rows.iter().map(|r| r.id)))
                        .exec(txn)
                        .await?;
                }
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|row| {
                let mut n = Notification::try_from(row)?;
                n.attempts += 1;
                Ok(n)
            })
            .collect()
    }

    /// Delivered: never sent again.
    pub async fn notifications_sent(&self, ids: &[Uuid]) -> Result<()> {
        self.with_db(async |db| {
            outbox::Entity::update_many()
                .col_expr(outbox::Column::SentAt, Expr::value(now()))
                .col_expr(
                    outbox::Column::LockedUntil,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(
                    outbox::Column::LastError,
                    Expr::value(Option::<String>::None),
                )
                .filter(outbox::Column::Id.is_in(ids.iter().copied()))
                .exec(db)
                .await?;
            Ok(())
        })
        .await
    }

    /// Not delivered: tried again from `retry_at`. `error` says why (None: held back, not
    /// a failure, and the lease does not count as an attempt).
    pub async fn notifications_later(
        &self,
        ids: &[Uuid],
        retry_at: DateTime<Utc>,
        error: Option<&str>,
    ) -> Result<()> {
        let mut update = outbox::Entity::update_many()
            .col_expr(outbox::Column::NextAttemptAt, Expr::value(retry_at))
            .col_expr(
                outbox::Column::LockedUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            );
        update = match error {
            Some(error) => update.col_expr(outbox::Column::LastError, Expr::value(error)),
            None => update.col_expr(
                outbox::Column::Attempts,
                Expr::col(outbox::Column::Attempts).sub(1),
            ),
        };
        let update = update
            .filter(outbox::Column::Id.is_in(ids.iter().copied()))
            .filter(outbox::Column::SentAt.is_null());
        self.with_db(async |db| {
            update.exec(db).await?;
            Ok(())
        })
        .await
    }

    /// When the latest mail of a group went out.
    pub async fn last_mail_of_group(&self, group_key: &str) -> Result<Option<DateTime<Utc>>> {
        self.with_db(async |db| {
            let row = outbox::Entity::find()
                .filter(outbox::Column::GroupKey.eq(group_key))
                .filter(outbox::Column::Channel.eq(Channel::Email.as_str()))
                .filter(outbox::Column::SentAt.is_not_null())
                .order_by_desc(outbox::Column::SentAt)
                .one(db)
                .await?;
            Ok(row.and_then(|r| r.sent_at))
        })
        .await
    }

    /// A tenant's notification settings (the sender needs the webhook's secret).
    pub async fn tenant_notifications(&self, tenant_id: TenantId) -> Result<TenantNotifications> {
        self.with_db(async |db| {
            let tenant = tenant::Entity::find_by_id(Uuid::from(tenant_id))
                .one(db)
                .await?
                .ok_or(Error::NotFound("tenant"))?;
            Ok(settings_of(tenant))
        })
        .await
    }

    /// Every queued delivery of a tenant, oldest first, sent or not (tests, operators).
    pub async fn notifications_of(
        &self,
        tenant_id: TenantId,
    ) -> Result<Vec<(Notification, Option<DateTime<Utc>>)>> {
        let rows = self.outbox_of(tenant_id).await?;
        rows.into_iter()
            .map(|row| {
                let sent = row.sent_at;
                Ok((Notification::try_from(row)?, sent))
            })
            .collect()
    }

    /// The kind and payload of every queued delivery of a tenant, oldest first (tests).
    pub async fn outbox_kinds(&self, tenant_id: TenantId) -> Result<Vec<(String, Value)>> {
        let rows = self.outbox_of(tenant_id).await?;
        Ok(rows.into_iter().map(|r| (r.kind, r.payload)).collect())
    }

    async fn outbox_of(&self, tenant_id: TenantId) -> Result<Vec<outbox::Model>> {
        self.with_db(async |db| {
            Ok(outbox::Entity::find()
                .filter(outbox::Column::TenantId.eq(Uuid::from(tenant_id)))
                .order_by_asc(outbox::Column::Id)
                .all(db)
                .await?)
        })
        .await
    }
}

fn settings_of(tenant: tenant::Model) -> TenantNotifications {
    TenantNotifications {
        emails: emails_of(tenant.notify_emails),
        webhook_url: tenant.webhook_url,
        webhook_secret: tenant.webhook_secret,
    }
}

impl TenantHandle {
    /// The tenant's notification settings, without the webhook secret.
    pub async fn notifications(&self) -> Result<TenantNotifications> {
        let tenant = self
            .reading(Action::Read, async |txn| self.tenant_row(txn).await)
            .await?;
        Ok(TenantNotifications {
            webhook_secret: None,
            ..settings_of(tenant)
        })
    }

    async fn tenant_row(&self, conn: &impl ConnectionTrait) -> DbResult<tenant::Model> {
        Ok(self
            .find::<tenant::Entity>()
            .one(conn)
            .await?
            .ok_or(Error::NotFound("tenant"))?)
    }

    /// Replaces the tenant's default recipients and webhook. A webhook needs a secret of
    /// at least 16 characters; an absent secret keeps the stored one.
    pub async fn set_notifications(&self, settings: TenantNotifications) -> Result<()> {
        self.require(Action::ManageNotifications).await?;
        cloudtask_core::task::validate_emails(&settings.emails)?;
        if let Some(url) = &settings.webhook_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Error::bad_input(
                "webhookUrl",
                "must be an http:// or https:// URL",
            ));
        }
        if let Some(secret) = &settings.webhook_secret
            && secret.chars().count() < 16
        {
            return Err(Error::bad_input(
                "webhookSecret",
                "must be at least 16 characters",
            ));
        }
        self.scoped(Action::ManageNotifications, async |txn| {
            let current = self.tenant_row(txn).await?;
            let secret = settings.webhook_secret.or(current.webhook_secret);
            if settings.webhook_url.is_some() && secret.is_none() {
                Err(Error::bad_input(
                    "webhookSecret",
                    "a webhook needs a secret to sign its deliveries",
                ))?;
            }
            tenant::Entity::update_many()
                .col_expr(
                    tenant::Column::NotifyEmails,
                    Expr::value(json!(settings.emails)),
                )
                .col_expr(
                    tenant::Column::WebhookUrl,
                    Expr::value(settings.webhook_url),
                )
                .col_expr(tenant::Column::WebhookSecret, Expr::value(secret))
                .filter(self.within::<tenant::Entity>())
                .exec(txn)
                .await?;
            self.audit(txn, "setNotificationSettings", "tenant", self.tenant_id())
                .await
        })
        .await
    }
}
