//! Platform-level operations: users, logins, refresh tokens, tenants, worker join.
//! None of these read or write a tenant's clusters or tasks.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, TenantId, UserId};
use cloudtask_core::roles::Role;
use cloudtask_core::task::{validate_email, validate_name};
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use uuid::Uuid;

use crate::entities::{cluster, membership, package, refresh_token, task, tenant, user};
use crate::records::{Cluster, Membership, Tenant, User, UserCredentials};
use crate::{Catalogue, conflict_or, db_err, now};

/// A user to create, with the password already hashed by the caller.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub password_hash: String,
    pub platform_admin: bool,
}

/// What presenting a refresh token led to.
#[derive(Debug)]
pub enum RefreshOutcome {
    /// The token was live and is now spent; issue the next one in `family`.
    Rotated {
        user_id: UserId,
        tenant_id: Option<TenantId>,
        family: Uuid,
    },
    /// Unknown, expired or revoked.
    Invalid,
    /// Already spent: somebody replayed it, so its whole family is now revoked.
    Reused,
}

pub(crate) fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Writes an audit row inside the caller's transaction.
pub(crate) async fn audit(
    conn: &impl ConnectionTrait,
    tenant_id: Option<TenantId>,
    actor: Option<(UserId, &str)>,
    operation: &str,
    object_type: &str,
    object_id: Option<String>,
) -> Result<()> {
    use crate::entities::audit;
    audit::Entity::insert(audit::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id.map(Into::into)),
        actor_id: Set(actor.map(|(id, _)| id.into())),
        actor: Set(actor
            .map(|(_, email)| email.to_owned())
            .unwrap_or_else(|| "system".into())),
        operation: Set(operation.into()),
        object_type: Set(object_type.into()),
        object_id: Set(object_id),
        created_at: Set(now()),
    })
    .exec(conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

pub(crate) async fn insert_user(conn: &impl ConnectionTrait, new: &NewUser) -> Result<User> {
    let email = normalise_email(&new.email);
    validate_email("email", &email)?;
    let model = user::ActiveModel {
        id: Set(UserId::new().into()),
        email: Set(email),
        password_hash: Set(new.password_hash.clone()),
        platform_admin: Set(new.platform_admin),
        created_at: Set(now()),
    };
    let model = user::Entity::insert(model)
        .exec_with_returning(conn)
        .await
        .map_err(|e| conflict_or(e, "a user with this email"))?;
    Ok(model.into())
}

pub(crate) async fn find_user_by_email(
    conn: &impl ConnectionTrait,
    email: &str,
) -> Result<Option<user::Model>> {
    user::Entity::find()
        .filter(user::Column::Email.eq(normalise_email(email)))
        .one(conn)
        .await
        .map_err(db_err)
}

impl Catalogue {
    /// Bootstrap: `cloudtask admin create-user`. Not reachable from GraphQL.
    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        let txn = self.db.begin().await.map_err(db_err)?;
        let user = insert_user(&txn, &new).await?;
        audit(
            &txn,
            None,
            None,
            "createUser",
            "user",
            Some(user.id.to_string()),
        )
        .await?;
        txn.commit().await.map_err(db_err)?;
        Ok(user)
    }

    pub async fn user_credentials(&self, email: &str) -> Result<Option<UserCredentials>> {
        Ok(find_user_by_email(&self.db, email)
            .await?
            .map(|m| UserCredentials {
                password_hash: m.password_hash.clone(),
                user: m.into(),
            }))
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>> {
        let found = user::Entity::find_by_id(Uuid::from(id))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(found.map(Into::into))
    }

    /// The user's tenants with their role, oldest membership first.
    pub async fn memberships(&self, user_id: UserId) -> Result<Vec<Membership>> {
        let rows = membership::Entity::find()
            .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
            .order_by_asc(membership::Column::CreatedAt)
            .find_also_related(tenant::Entity)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(m, t)| {
                Some(Membership {
                    tenant: t?.into(),
                    role: Role::parse(&m.role)?,
                })
            })
            .collect())
    }

    /// The user's current role in a tenant, if they are a member.
    pub async fn role_in(&self, user_id: UserId, tenant_id: TenantId) -> Result<Option<Role>> {
        let found = membership::Entity::find_by_id((tenant_id.into(), user_id.into()))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(found.and_then(|m| Role::parse(&m.role)))
    }

    /// A platform admin creates a tenant and names its first owner, creating the owner's
    /// account when it does not exist yet (then `owner_password_hash` is required).
    pub async fn create_tenant(
        &self,
        actor: (UserId, &str),
        name: &str,
        owner_email: &str,
        owner_password_hash: Option<String>,
    ) -> Result<Tenant> {
        validate_name("name", name)?;
        validate_email("ownerEmail", &normalise_email(owner_email))?;
        let txn = self.db.begin().await.map_err(db_err)?;
        let owner = match find_user_by_email(&txn, owner_email).await? {
            Some(existing) => User::from(existing),
            None => {
                let password_hash = owner_password_hash
                    .ok_or_else(|| Error::bad_input("ownerPassword", "required for a new user"))?;
                insert_user(
                    &txn,
                    &NewUser {
                        email: owner_email.into(),
                        password_hash,
                        platform_admin: false,
                    },
                )
                .await?
            }
        };
        let tenant = tenant::Entity::insert(tenant::ActiveModel {
            id: Set(TenantId::new().into()),
            name: Set(name.trim().to_owned()),
            created_at: Set(now()),
            notify_emails: Set(None),
            webhook_url: Set(None),
            webhook_secret: Set(None),
        })
        .exec_with_returning(&txn)
        .await
        .map_err(|e| conflict_or(e, "a tenant with this name"))?;
        let tenant = Tenant::from(tenant);
        membership::Entity::insert(membership::ActiveModel {
            tenant_id: Set(tenant.id.into()),
            user_id: Set(owner.id.into()),
            role: Set(Role::Owner.as_str().into()),
            created_at: Set(now()),
        })
        .exec(&txn)
        .await
        .map_err(db_err)?;
        audit(
            &txn,
            Some(tenant.id),
            Some(actor),
            "createTenant",
            "tenant",
            Some(tenant.id.to_string()),
        )
        .await?;
        txn.commit().await.map_err(db_err)?;
        Ok(tenant)
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = tenant::Entity::find()
            .order_by_asc(tenant::Column::Id)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Stores a new refresh token (hash only) in `family`.
    pub async fn insert_refresh_token(
        &self,
        user_id: UserId,
        tenant_id: Option<TenantId>,
        family: Uuid,
        token_hash: String,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        refresh_token::Entity::insert(refresh_token::ActiveModel {
            id: Set(Uuid::now_v7()),
            family_id: Set(family),
            user_id: Set(user_id.into()),
            tenant_id: Set(tenant_id.map(Into::into)),
            token_hash: Set(token_hash),
            expires_at: Set(expires_at),
            used_at: Set(None),
            revoked_at: Set(None),
            created_at: Set(now()),
        })
        .exec(&self.db)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Spends a refresh token. The spend is a conditional update (`used_at IS NULL`), so of
    /// two concurrent presentations exactly one rotates and the other counts as reuse.
    pub async fn spend_refresh_token(&self, token_hash: &str) -> Result<RefreshOutcome> {
        let Some(row) = refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(token_hash))
            .one(&self.db)
            .await
            .map_err(db_err)?
        else {
            return Ok(RefreshOutcome::Invalid);
        };
        let now = now();
        if row.revoked_at.is_some() || row.expires_at <= now {
            return Ok(RefreshOutcome::Invalid);
        }
        let spent = refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::UsedAt, Expr::value(now))
            .filter(refresh_token::Column::Id.eq(row.id))
            .filter(refresh_token::Column::UsedAt.is_null())
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        if spent.rows_affected == 1 {
            return Ok(RefreshOutcome::Rotated {
                user_id: row.user_id.into(),
                tenant_id: row.tenant_id.map(Into::into),
                family: row.family_id,
            });
        }
        self.revoke_family(row.family_id).await?;
        tracing::warn!(user = %UserId::from(row.user_id), "refresh token reused; family revoked");
        Ok(RefreshOutcome::Reused)
    }

    /// Logout: revokes the token's whole family. Unknown tokens are ignored.
    pub async fn revoke_refresh_token(&self, token_hash: &str) -> Result<bool> {
        let row = refresh_token::Entity::find()
            .filter(refresh_token::Column::TokenHash.eq(token_hash))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        match row {
            Some(row) => {
                self.revoke_family(row.family_id).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn revoke_family(&self, family: Uuid) -> Result<()> {
        refresh_token::Entity::update_many()
            .col_expr(refresh_token::Column::RevokedAt, Expr::value(now()))
            .filter(refresh_token::Column::FamilyId.eq(family))
            .filter(refresh_token::Column::RevokedAt.is_null())
            .exec(&self.db)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// A worker presents its cluster's join token (hashed by the caller).
    pub async fn cluster_by_join_token(&self, token_hash: &str) -> Result<Option<Cluster>> {
        let found = cluster::Entity::find()
            .filter(cluster::Column::JoinTokenHash.eq(token_hash))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(found.map(Into::into))
    }

    /// A package, for a worker of `cluster_id`: only if a task of that cluster uses it.
    pub async fn package_for_cluster(
        &self,
        cluster_id: ClusterId,
        sha256: &str,
    ) -> Result<Option<Vec<u8>>> {
        let Some(task) = task::Entity::find()
            .filter(task::Column::ClusterId.eq(Uuid::from(cluster_id)))
            .filter(task::Column::PackageSha256.eq(sha256))
            .one(&self.db)
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let found = package::Entity::find_by_id((task.tenant_id, sha256.to_owned()))
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(found.map(|p| p.content))
    }
}

/// Inserts a package row unless the tenant already holds these bytes (content-addressed).
pub(crate) async fn insert_package_if_absent(
    conn: &impl ConnectionTrait,
    model: package::ActiveModel,
) -> Result<()> {
    package::Entity::insert(model)
        .on_conflict_do_nothing_on([package::Column::TenantId, package::Column::Sha256])
        .exec(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}
