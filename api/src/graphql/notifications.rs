//! The tenant's notification settings: default recipients and the webhook (whose secret
//! is written, never shown).

use async_graphql::{Context, Object};
use cloudtask_catalogue::notifications::TenantNotifications;
use cloudtask_core::roles::Action;

use super::inputs::NotificationSettingsInput;
use super::{state, tenant};
use crate::error::ApiResult;

#[derive(Default)]
pub struct NotificationQuery;

#[Object]
impl NotificationQuery {
    /// The tenant's default recipients and webhook (its secret is never shown).
    async fn notification_settings(&self, ctx: &Context<'_>) -> ApiResult<NotificationSettingsObj> {
        Ok(NotificationSettingsObj(
            tenant(ctx).await?.notifications().await?,
        ))
    }
}

#[derive(Default)]
pub struct NotificationMutation;

#[Object]
impl NotificationMutation {
    /// Replaces the tenant's notification settings (ADMIN and above).
    async fn set_notification_settings(
        &self,
        ctx: &Context<'_>,
        input: NotificationSettingsInput,
    ) -> ApiResult<NotificationSettingsObj> {
        let handle = tenant(ctx).await?;
        // The URL is checked against the outbound policy by the one who may set it.
        if let Some(url) = &input.webhook_url
            && handle.role().await?.allows(Action::ManageNotifications)
        {
            let policy = state(ctx).config.outbound_policy();
            crate::webhooks::check_webhook_url(&policy, url).await?;
        }
        handle.set_notifications(input.into()).await?;
        Ok(NotificationSettingsObj(handle.notifications().await?))
    }
}

/// Where a tenant's events go besides each task's own recipients.
pub struct NotificationSettingsObj(pub TenantNotifications);

#[Object(name = "NotificationSettings")]
impl NotificationSettingsObj {
    /// Recipients of every failure and worker event.
    async fn notify_emails(&self) -> &[String] {
        &self.0.emails
    }
    async fn webhook_url(&self) -> Option<&str> {
        self.0.webhook_url.as_deref()
    }
}
