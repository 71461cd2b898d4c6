//! Accounts: users (bootstrap, login look-ups) and refresh tokens. Platform-level: none
//! of this reads or writes a tenant's clusters or tasks.

use chrono::{DateTime, Utc};
use cloudtask_core::Result;
use cloudtask_core::ids::{TenantId, UserId};
use cloudtask_core::task::validate_email;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use uuid::Uuid;

use crate::audit::write_audit;
use crate::entities::{refresh_token, user};
use crate::error::{DbResult, conflict_as};
use crate::{Catalogue, now};

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub platform_admin: bool,
    pub created_at: DateTime<Utc>,
}

/// A user with the password hash, for login only.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: String,
}

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
    /// Already spent: somebody replayed it, so the whole family (the user's login) is now
    /// revoked.
    Reused { user_id: UserId },
}

impl From<user::Model> for User {
    fn from(m: user::Model) -> Self {
        User {
            id: m.id.into(),
            email: m.email,
            platform_admin: m.platform_admin,
            created_at: m.created_at,
        }
    }
}

pub(crate) fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

pub(crate) async fn insert_user(conn: &impl ConnectionTrait, new: &NewUser) -> DbResult<User> {
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
        .map_err(conflict_as("a user with this email"))?;
    Ok(model.into())
}

pub(crate) async fn find_user_by_email(
    conn: &impl ConnectionTrait,
    email: &str,
) -> DbResult<Option<user::Model>> {
    Ok(user::Entity::find()
        .filter(user::Column::Email.eq(normalise_email(email)))
        .one(conn)
        .await?)
}

/// The user with `email`, created (with `password_hash`, required then) when new.
pub(crate) async fn user_or_new(
    conn: &impl ConnectionTrait,
    email: &str,
    password_hash: Option<String>,
    password_field: &str,
) -> DbResult<User> {
    if let Some(existing) = find_user_by_email(conn, email).await? {
        return Ok(existing.into());
    }
    let password_hash = password_hash.ok_or_else(|| {
        cloudtask_core::Error::bad_input(password_field, "required for a new user")
    })?;
    let new = NewUser {
        email: email.into(),
        password_hash,
        platform_admin: false,
    };
    insert_user(conn, &new).await
}

impl Catalogue {
    /// Bootstrap: `cloudtask admin create-user`. Not reachable from GraphQL.
    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        self.in_transaction(async |txn| {
            let user = insert_user(txn, &new).await?;
            let id = Some(user.id.to_string());
            write_audit(txn, None, None, "createUser", "user", id).await?;
            Ok(user)
        })
        .await
    }

    pub async fn user_credentials(&self, email: &str) -> Result<Option<UserCredentials>> {
        self.with_db(async |db| {
            Ok(find_user_by_email(db, email)
                .await?
                .map(|m| UserCredentials {
                    password_hash: m.password_hash.clone(),
                    user: m.into(),
                }))
        })
        .await
    }

    pub async fn user(&self, id: UserId) -> Result<Option<User>> {
        self.with_db(async |db| {
            let found = user::Entity::find_by_id(Uuid::from(id)).one(db).await?;
            Ok(found.map(Into::into))
        })
        .await
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
        self.with_db(async |db| {
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
            .exec(db)
            .await?;
            Ok(())
        })
        .await
    }

    /// Spends a refresh token. The spend is a conditional update (`used_at IS NULL`), so of
    /// two concurrent presentations exactly one rotates and the other counts as reuse.
    pub async fn spend_refresh_token(&self, token_hash: &str) -> Result<RefreshOutcome> {
        self.with_db(async |db| {
            let Some(row) = refresh_token_by_hash(db, token_hash).await? else {
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
                .exec(db)
                .await?;
            if spent.rows_affected == 1 {
                return Ok(RefreshOutcome::Rotated {
                    user_id: row.user_id.into(),
                    tenant_id: row.tenant_id.map(Into::into),
                    family: row.family_id,
                });
            }
            revoke_family(db, row.family_id).await?;
            let user_id = UserId::from(row.user_id);
            tracing::warn!(user = %user_id, "refresh token reused; family revoked");
            Ok(RefreshOutcome::Reused { user_id })
        })
        .await
    }

    /// Logins (refresh-token families) revoked since `since`, of one user or of everyone:
    /// what an API replica must refuse access tokens of until they expire.
    pub async fn logins_revoked_since(
        &self,
        since: DateTime<Utc>,
        user: Option<UserId>,
    ) -> Result<Vec<Uuid>> {
        self.with_db(async |db| {
            let mut query = refresh_token::Entity::find()
                .select_only()
                .column(refresh_token::Column::FamilyId)
                .distinct()
                .filter(refresh_token::Column::RevokedAt.gte(since));
            if let Some(user) = user {
                query = query.filter(refresh_token::Column::UserId.eq(Uuid::from(user)));
            }
            Ok(query.into_tuple::<Uuid>().all(db).await?)
        })
        .await
    }

    /// Logout: revokes the token's whole family; whose login it was. Unknown tokens are
    /// ignored.
    pub async fn revoke_refresh_token(&self, token_hash: &str) -> Result<Option<UserId>> {
        self.with_db(
            async |db| match refresh_token_by_hash(db, token_hash).await? {
                Some(row) => {
                    revoke_family(db, row.family_id).await?;
                    Ok(Some(row.user_id.into()))
                }
                None => Ok(None),
            },
        )
        .await
    }
}

async fn refresh_token_by_hash(
    conn: &impl ConnectionTrait,
    token_hash: &str,
) -> DbResult<Option<refresh_token::Model>> {
    Ok(refresh_token::Entity::find()
        .filter(refresh_token::Column::TokenHash.eq(token_hash))
        .one(conn)
        .await?)
}

async fn revoke_family(conn: &impl ConnectionTrait, family: Uuid) -> DbResult<()> {
    refresh_token::Entity::update_many()
        .col_expr(refresh_token::Column::RevokedAt, Expr::value(now()))
        .filter(refresh_token::Column::FamilyId.eq(family))
        .filter(refresh_token::Column::RevokedAt.is_null())
        .exec(conn)
        .await?;
    Ok(())
}
