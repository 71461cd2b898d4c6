use std::collections::BTreeMap;

use async_graphql::{Context, ID, InputObject, MaybeUndefined, Object, Upload};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::notifications::TenantNotifications;
use cloudtask_catalogue::{NewPackage, NewTask, RefreshOutcome};
use cloudtask_core::archive::{self, Limits};
use cloudtask_core::ids::{TaskId, TenantId, UserId};
use cloudtask_core::roles::Role;
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_core::{Error, Result};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::types::{
    AuthPayload, ClusterObj, ClusterWithToken, MemberObj, MisfirePolicyGql,
    NotificationSettingsObj, OverlapPolicyGql, RoleGql, RunObj, TaskObj, TenantObj, UserObj,
    parse_id,
};
use super::{identity, request, state, tenant};
use crate::AppState;
use crate::auth::{self, hash_password, random_token, token_hash, validate_password};
use crate::error::ApiResult;

pub struct MutationRoot;

#[derive(InputObject)]
pub struct CreateTenantInput {
    pub name: String,
    /// The first owner. An existing account is reused; a new one needs `ownerPassword`.
    pub owner_email: String,
    pub owner_password: Option<String>,
}

/// Who hears about the tenant's failures besides each task's `notifyEmails`, and where
/// events are POSTed.
#[derive(InputObject)]
pub struct NotificationSettingsInput {
    pub notify_emails: Vec<String>,
    /// An http(s) URL that receives every event as signed JSON; null turns it off.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key of the `X-CloudTask-Signature` header (at least 16
    /// characters); omitted: the stored one stays.
    pub webhook_secret: Option<String>,
}

#[derive(InputObject)]
pub struct AddMemberInput {
    pub email: String,
    pub role: RoleGql,
    /// Required when no account exists for the email yet.
    pub password: Option<String>,
}

#[derive(InputObject, Clone)]
pub struct EnvVarInput {
    pub name: String,
    pub value: String,
}

#[derive(InputObject)]
pub struct CreateTaskInput {
    pub cluster_id: ID,
    pub name: String,
    #[graphql(default)]
    pub description: String,
    pub schedule: String,
    /// IANA timezone; UTC when omitted.
    pub timezone: Option<String>,
    pub command: String,
    pub env: Option<Vec<EnvVarInput>>,
    pub timeout_seconds: Option<u32>,
    pub overlap_policy: Option<OverlapPolicyGql>,
    pub misfire_policy: Option<MisfirePolicyGql>,
    pub misfire_grace_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_backoff_seconds: Option<u32>,
    pub active_from: Option<DateTime<Utc>>,
    pub active_until: Option<DateTime<Utc>>,
    pub labels: Option<Vec<String>>,
    pub notify_emails: Option<Vec<String>>,
    /// Create the task paused.
    #[graphql(default)]
    pub paused: bool,
    /// The program: a zip or tar.gz archive (GraphQL multipart request).
    pub package: Option<Upload>,
    /// Or a package already uploaded to this tenant, by hash.
    pub package_sha256: Option<String>,
}

#[derive(InputObject)]
pub struct UpdateTaskInput {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub command: Option<String>,
    /// Replaces the whole environment.
    pub env: Option<Vec<EnvVarInput>>,
    /// `null` removes the timeout.
    pub timeout_seconds: MaybeUndefined<u32>,
    pub overlap_policy: Option<OverlapPolicyGql>,
    pub misfire_policy: Option<MisfirePolicyGql>,
    pub misfire_grace_seconds: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_backoff_seconds: Option<u32>,
    pub active_from: MaybeUndefined<DateTime<Utc>>,
    pub active_until: MaybeUndefined<DateTime<Utc>>,
    pub labels: Option<Vec<String>>,
    pub notify_emails: Option<Vec<String>>,
    /// Switch to another package of this tenant (e.g. back to an earlier one).
    pub package_sha256: Option<String>,
}

fn env_map(env: Vec<EnvVarInput>) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for var in env {
        if map.insert(var.name.clone(), var.value).is_some() {
            return Err(Error::bad_input("env", format!("{} given twice", var.name)));
        }
    }
    Ok(map)
}

fn merge<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn merge_nullable<T>(target: &mut Option<T>, value: MaybeUndefined<T>) {
    match value {
        MaybeUndefined::Undefined => {}
        MaybeUndefined::Null => *target = None,
        MaybeUndefined::Value(v) => *target = Some(v),
    }
}

impl UpdateTaskInput {
    fn apply(self, spec: &mut TaskSpec) -> Result<()> {
        merge(&mut spec.schedule, self.schedule);
        merge(&mut spec.timezone, self.timezone);
        merge(&mut spec.command, self.command);
        merge(&mut spec.env, self.env.map(env_map).transpose()?);
        merge_nullable(&mut spec.timeout_seconds, self.timeout_seconds);
        merge(
            &mut spec.overlap_policy,
            self.overlap_policy.map(Into::into),
        );
        merge(
            &mut spec.misfire_policy,
            self.misfire_policy.map(Into::into),
        );
        merge(&mut spec.misfire_grace_seconds, self.misfire_grace_seconds);
        merge(&mut spec.max_retries, self.max_retries);
        merge(&mut spec.retry_backoff_seconds, self.retry_backoff_seconds);
        merge_nullable(&mut spec.active_from, self.active_from);
        merge_nullable(&mut spec.active_until, self.active_until);
        merge(&mut spec.labels, self.labels);
        merge(&mut spec.notify_emails, self.notify_emails);
        if let Some(sha) = self.package_sha256 {
            spec.package_sha256 = Some(sha);
        }
        Ok(())
    }
}

/// Reads an uploaded archive and inspects it (off the async runtime: it decompresses).
async fn read_package(ctx: &Context<'_>, field: &str, upload: &Upload) -> Result<NewPackage> {
    let value = upload.value(ctx).map_err(|e| Error::bad_input(field, e))?;
    let content = value.content.to_vec();
    let config = &state(ctx).config;
    let limits = Limits {
        max_archive_bytes: config.max_package_bytes,
        max_unpacked_bytes: config.max_unpacked_bytes,
        max_entries: config.max_package_entries,
    };
    let field = field.to_owned();
    tokio::task::spawn_blocking(move || {
        let summary =
            archive::inspect(&content, &limits).map_err(|e| Error::bad_input(&field, e))?;
        let sha256 = hex::encode(Sha256::digest(&content));
        Ok(NewPackage {
            sha256,
            summary,
            content,
        })
    })
    .await
    .map_err(Error::internal)?
}

fn new_cluster_token() -> (String, String) {
    let token = random_token("ctj_");
    let hash = token_hash(&token);
    (token, hash)
}

async fn issue_tokens(
    state: &AppState,
    user_id: UserId,
    tenant_id: Option<TenantId>,
    family: Uuid,
) -> Result<AuthPayload> {
    let user = state
        .catalogue
        .user(user_id)
        .await?
        .ok_or_else(|| Error::Unauthenticated("unknown user".into()))?;
    let tenant_role = match tenant_id {
        None => None,
        Some(tenant_id) => {
            let role = state
                .catalogue
                .role_in(user_id, tenant_id)
                .await?
                .ok_or_else(|| {
                    Error::Unauthenticated("no longer a member of this tenant".into())
                })?;
            let memberships = state.catalogue.memberships(user_id).await?;
            let tenant = memberships
                .into_iter()
                .find(|m| m.tenant.id == tenant_id)
                .map(|m| m.tenant)
                .ok_or(Error::NotFound("tenant"))?;
            Some((tenant, role))
        }
    };
    let access = state.keys.issue_access(
        user_id,
        tenant_role
            .as_ref()
            .map(|(tenant, role)| (tenant.id, *role)),
        user.platform_admin,
    )?;
    let refresh_token = random_token("rt_");
    state
        .catalogue
        .insert_refresh_token(
            user_id,
            tenant_id,
            family,
            token_hash(&refresh_token),
            Utc::now() + chrono::Duration::seconds(state.config.refresh_token_ttl_secs as i64),
        )
        .await?;
    Ok(AuthPayload {
        access_token: access.token,
        access_token_expires_at: access.expires_at,
        refresh_token,
        user: UserObj(user),
        tenant_role,
    })
}

#[Object(name = "Mutation")]
impl MutationRoot {
    /// Exchanges email and password for tokens. `tenantId` picks the tenant to act in;
    /// without it, the user's first tenant (or none, for a platform admin without one).
    async fn login(
        &self,
        ctx: &Context<'_>,
        email: String,
        password: String,
        tenant_id: Option<ID>,
    ) -> ApiResult<AuthPayload> {
        let state = state(ctx);
        let client_ip = request(ctx).client_ip;
        let tenant_id: Option<TenantId> = tenant_id
            .as_ref()
            .map(|id| parse_id("tenantId", id))
            .transpose()?;
        state.logins.check(&email, client_ip)?;
        let credentials = state.catalogue.user_credentials(&email).await?;
        let hash = credentials.as_ref().map(|c| c.password_hash.clone());
        let verified = tokio::task::spawn_blocking(move || match hash {
            Some(hash) => auth::verify_password(&password, &hash),
            None => {
                // Same work for unknown accounts, so timing does not reveal which exist.
                auth::burn_password_check(&password);
                false
            }
        })
        .await
        .map_err(Error::internal)?;
        let Some(credentials) = credentials.filter(|_| verified) else {
            state.logins.record_failure(&email, client_ip);
            return Err(Error::Unauthenticated("invalid email or password".into()).into());
        };
        state.logins.record_success(&email);
        let user_id = credentials.user.id;
        let memberships = state.catalogue.memberships(user_id).await?;
        let tenant_id = match tenant_id {
            Some(wanted) => {
                if !memberships.iter().any(|m| m.tenant.id == wanted) {
                    return Err(Error::Forbidden("not a member of this tenant".into()).into());
                }
                Some(wanted)
            }
            None => memberships.first().map(|m| m.tenant.id),
        };
        let payload = issue_tokens(state, user_id, tenant_id, Uuid::now_v7()).await?;
        state
            .catalogue
            .record_audit(tenant_id, user_id, "login")
            .await?;
        Ok(payload)
    }

    /// Spends a refresh token for a new pair. Each refresh token works once; presenting a
    /// spent one revokes every token of that login.
    async fn refresh_token(
        &self,
        ctx: &Context<'_>,
        refresh_token: String,
    ) -> ApiResult<AuthPayload> {
        let state = state(ctx);
        match state
            .catalogue
            .spend_refresh_token(&token_hash(&refresh_token))
            .await?
        {
            RefreshOutcome::Rotated {
                user_id,
                tenant_id,
                family,
            } => Ok(issue_tokens(state, user_id, tenant_id, family).await?),
            RefreshOutcome::Invalid => {
                Err(Error::Unauthenticated("invalid or expired refresh token".into()).into())
            }
            RefreshOutcome::Reused => Err(Error::Unauthenticated(
                "refresh token already used; this login is revoked".into(),
            )
            .into()),
        }
    }

    /// Revokes the refresh token and every token rotated from the same login.
    async fn logout(&self, ctx: &Context<'_>, refresh_token: String) -> ApiResult<bool> {
        let state = state(ctx);
        let revoked = state
            .catalogue
            .revoke_refresh_token(&token_hash(&refresh_token))
            .await?;
        if let Some(Ok(identity)) = &request(ctx).auth {
            state
                .catalogue
                .record_audit(identity.tenant_id, identity.user_id, "logout")
                .await?;
        }
        Ok(revoked)
    }

    /// Platform admins only.
    async fn create_tenant(
        &self,
        ctx: &Context<'_>,
        input: CreateTenantInput,
    ) -> ApiResult<TenantObj> {
        let identity = identity(ctx)?;
        if !identity.platform_admin {
            return Err(Error::Forbidden("platform admins only".into()).into());
        }
        let password_hash = match input.owner_password {
            Some(password) => {
                validate_password("ownerPassword", &password)?;
                Some(hash_blocking(password).await?)
            }
            None => None,
        };
        let actor = identity.user_id.to_string();
        let tenant = state(ctx)
            .catalogue
            .create_tenant(
                (identity.user_id, &actor),
                &input.name,
                &input.owner_email,
                password_hash,
            )
            .await?;
        Ok(TenantObj(tenant))
    }

    async fn add_member(&self, ctx: &Context<'_>, input: AddMemberInput) -> ApiResult<MemberObj> {
        let handle = tenant(ctx).await?;
        let password_hash = match input.password {
            Some(password) => {
                validate_password("password", &password)?;
                Some(hash_blocking(password).await?)
            }
            None => None,
        };
        Ok(MemberObj(
            handle
                .add_member(&input.email, input.role.into(), password_hash)
                .await?,
        ))
    }

    async fn set_member_role(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        role: RoleGql,
    ) -> ApiResult<MemberObj> {
        let handle = tenant(ctx).await?;
        let role: Role = role.into();
        Ok(MemberObj(
            handle
                .set_member_role(parse_id("userId", &user_id)?, role)
                .await?,
        ))
    }

    async fn remove_member(&self, ctx: &Context<'_>, user_id: ID) -> ApiResult<bool> {
        tenant(ctx)
            .await?
            .remove_member(parse_id("userId", &user_id)?)
            .await?;
        Ok(true)
    }

    /// The join token is in the answer, once; only its hash is kept.
    async fn create_cluster(&self, ctx: &Context<'_>, name: String) -> ApiResult<ClusterWithToken> {
        let handle = tenant(ctx).await?;
        let (join_token, hash) = new_cluster_token();
        let cluster = handle.create_cluster(&name, hash).await?;
        Ok(ClusterWithToken {
            cluster: ClusterObj(cluster),
            join_token,
        })
    }

    /// Replaces the tenant's notification settings (ADMIN and above).
    async fn set_notification_settings(
        &self,
        ctx: &Context<'_>,
        input: NotificationSettingsInput,
    ) -> ApiResult<NotificationSettingsObj> {
        let handle = tenant(ctx).await?;
        if let Some(url) = &input.webhook_url
            && handle
                .role()
                .allows(cloudtask_core::roles::Action::ManageNotifications)
        {
            let policy = state(ctx).config.outbound_policy();
            crate::webhooks::check_webhook_url(&policy, url).await?;
        }
        handle
            .set_notifications(TenantNotifications {
                emails: input.notify_emails,
                webhook_url: input.webhook_url,
                webhook_secret: input.webhook_secret,
            })
            .await?;
        Ok(NotificationSettingsObj(handle.notifications().await?))
    }

    /// Issues a new join token; the old one stops working at once.
    async fn rotate_cluster_token(&self, ctx: &Context<'_>, id: ID) -> ApiResult<ClusterWithToken> {
        let handle = tenant(ctx).await?;
        let (join_token, hash) = new_cluster_token();
        let cluster = handle
            .rotate_cluster_token(parse_id("id", &id)?, hash)
            .await?;
        Ok(ClusterWithToken {
            cluster: ClusterObj(cluster),
            join_token,
        })
    }

    /// Refused with CONFLICT while the cluster still has tasks.
    async fn delete_cluster(&self, ctx: &Context<'_>, id: ID) -> ApiResult<bool> {
        tenant(ctx)
            .await?
            .delete_cluster(parse_id("id", &id)?)
            .await?;
        Ok(true)
    }

    async fn create_task(&self, ctx: &Context<'_>, input: CreateTaskInput) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        let spec = TaskSpec {
            schedule: input.schedule,
            timezone: input.timezone.unwrap_or_else(|| "UTC".into()),
            command: input.command,
            env: env_map(input.env.unwrap_or_default())?,
            timeout_seconds: input.timeout_seconds,
            overlap_policy: input.overlap_policy.map(Into::into).unwrap_or_default(),
            misfire_policy: input.misfire_policy.map(Into::into).unwrap_or_default(),
            misfire_grace_seconds: input.misfire_grace_seconds.unwrap_or(60),
            max_retries: input.max_retries.unwrap_or(0),
            retry_backoff_seconds: input.retry_backoff_seconds.unwrap_or(10),
            package_sha256: input.package_sha256,
            active_from: input.active_from,
            active_until: input.active_until,
            labels: input.labels.unwrap_or_default(),
            notify_emails: input.notify_emails.unwrap_or_default(),
        };
        let new = NewTask {
            cluster_id: parse_id("clusterId", &input.cluster_id)?,
            name: input.name,
            description: input.description,
            state: if input.paused {
                TaskState::Paused
            } else {
                TaskState::Active
            },
            spec,
        };
        // Refuse bad fields before reading a possibly large upload.
        new.spec.validate()?;
        cloudtask_core::task::validate_name("name", &new.name)?;
        let package = match &input.package {
            Some(upload) => Some(read_package(ctx, "package", upload).await?),
            None => None,
        };
        Ok(handle.create_task(new, package).await?.into())
    }

    async fn update_task(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateTaskInput,
    ) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        let id: TaskId = parse_id("id", &id)?;
        let task = handle
            .update_task(id, |edit| {
                merge(&mut edit.name, input.name.clone());
                merge(&mut edit.description, input.description.clone());
                input.apply(&mut edit.spec)
            })
            .await?;
        Ok(task.into())
    }

    /// Replaces the task's program; a new task version.
    async fn upload_package(
        &self,
        ctx: &Context<'_>,
        task_id: ID,
        file: Upload,
    ) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        let id: TaskId = parse_id("taskId", &task_id)?;
        handle.task(id).await?;
        let package = read_package(ctx, "file", &file).await?;
        Ok(handle.set_task_package(id, package).await?.into())
    }

    /// Queues a manual run now; the task's worker starts it (QUEUED, then RUNNING).
    async fn run_task_now(&self, ctx: &Context<'_>, id: ID) -> ApiResult<RunObj> {
        let handle = tenant(ctx).await?;
        Ok(RunObj(handle.queue_run(parse_id("id", &id)?).await?))
    }

    /// Stops a run: a queued one at once, a running one through its worker, which
    /// terminates its process group and reports it STOPPED.
    async fn stop_run(&self, ctx: &Context<'_>, id: ID) -> ApiResult<RunObj> {
        let handle = tenant(ctx).await?;
        Ok(RunObj(handle.request_stop(parse_id("id", &id)?).await?))
    }

    async fn pause_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle
            .set_task_state(parse_id("id", &id)?, TaskState::Paused)
            .await?
            .into())
    }

    async fn resume_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle
            .set_task_state(parse_id("id", &id)?, TaskState::Active)
            .await?
            .into())
    }

    /// A copy under a new name, starting again at version 1.
    async fn clone_task(&self, ctx: &Context<'_>, id: ID, name: String) -> ApiResult<TaskObj> {
        let handle = tenant(ctx).await?;
        Ok(handle.clone_task(parse_id("id", &id)?, &name).await?.into())
    }

    async fn delete_task(&self, ctx: &Context<'_>, id: ID) -> ApiResult<bool> {
        tenant(ctx).await?.delete_task(parse_id("id", &id)?).await?;
        Ok(true)
    }
}

async fn hash_blocking(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(Error::internal)?
}
