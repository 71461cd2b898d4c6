//! Tenants and their members. A platform admin creates a tenant and names its first
//! owner; inside the tenant, members are managed through its handle, and a tenant keeps
//! at least one owner.

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{TenantId, UserId};
use cloudtask_core::roles::{Action, Role};
use cloudtask_core::task::{validate_email, validate_name};
use cloudtask_core::{Error, Result};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder,
};
use uuid::Uuid;

use crate::accounts::{User, normalise_email, user_or_new};
use crate::audit::write_audit;
use crate::entities::{membership, tenant, user};
use crate::error::{DbResult, conflict_as};
use crate::{Catalogue, TenantHandle, now};

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub user: User,
    pub tenant_id: TenantId,
    pub role: Role,
    pub created_at: DateTime<Utc>,
}

/// One of a user's tenants and their role in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub tenant: Tenant,
    pub role: Role,
}

impl From<tenant::Model> for Tenant {
    fn from(m: tenant::Model) -> Self {
        Tenant {
            id: m.id.into(),
            name: m.name,
            created_at: m.created_at,
        }
    }
}

fn member_of(m: membership::Model, u: user::Model) -> Option<Member> {
    Some(Member {
        tenant_id: m.tenant_id.into(),
        role: Role::parse(&m.role)?,
        created_at: m.created_at,
        user: u.into(),
    })
}

impl Catalogue {
    /// The user's tenants with their role, oldest membership first.
    pub async fn memberships(&self, user_id: UserId) -> Result<Vec<Membership>> {
        self.with_db(async |db| {
            let rows = membership::Entity::find()
                .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
                .order_by_asc(membership::Column::CreatedAt)
                .find_also_related(tenant::Entity)
                .all(db)
                .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(m, t)| {
                    Some(Membership {
                        tenant: t?.into(),
                        role: Role::parse(&m.role)?,
                    })
                })
                .collect())
        })
        .await
    }

    /// The user's current role in a tenant, if they are a member.
    pub async fn role_in(&self, user_id: UserId, tenant_id: TenantId) -> Result<Option<Role>> {
        self.with_db(async |db| {
            let found = membership::Entity::find_by_id((tenant_id.into(), user_id.into()))
                .one(db)
                .await?;
            Ok(found.and_then(|m| Role::parse(&m.role)))
        })
        .await
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
        self.in_transaction(async |txn| {
            let owner = user_or_new(txn, owner_email, owner_password_hash, "ownerPassword").await?;
            let tenant = tenant::Entity::insert(tenant::ActiveModel {
                id: Set(TenantId::new().into()),
                name: Set(name.trim().to_owned()),
                created_at: Set(now()),
                notify_emails: Set(None),
                webhook_url: Set(None),
                webhook_secret: Set(None),
                retention: Set(None),
                last_prune: Set(None),
            })
            .exec_with_returning(txn)
            .await
            .map_err(conflict_as("a tenant with this name"))?;
            let tenant = Tenant::from(tenant);
            membership::Entity::insert(membership::ActiveModel {
                tenant_id: Set(tenant.id.into()),
                user_id: Set(owner.id.into()),
                role: Set(Role::Owner.as_str().into()),
                created_at: Set(now()),
            })
            .exec(txn)
            .await?;
            let object = Some(tenant.id.to_string());
            write_audit(
                txn,
                Some(tenant.id),
                Some(actor),
                "createTenant",
                "tenant",
                object,
            )
            .await?;
            Ok(tenant)
        })
        .await
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        self.with_db(async |db| {
            let rows = tenant::Entity::find()
                .order_by_asc(tenant::Column::Id)
                .all(db)
                .await?;
            Ok(rows.into_iter().map(Into::into).collect())
        })
        .await
    }
}

impl TenantHandle {
    pub async fn tenant(&self) -> Result<Tenant> {
        self.reading(Action::Read, async |txn| {
            Ok(self
                .find::<tenant::Entity>()
                .one(txn)
                .await?
                .map(Into::into)
                .ok_or(Error::NotFound("tenant"))?)
        })
        .await
    }

    pub async fn members(&self) -> Result<Vec<Member>> {
        self.reading(Action::Read, async |txn| {
            let rows = self
                .find::<membership::Entity>()
                .order_by_asc(membership::Column::CreatedAt)
                .find_also_related(user::Entity)
                .all(txn)
                .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(m, u)| member_of(m, u?))
                .collect())
        })
        .await
    }

    async fn member_model(
        &self,
        conn: &impl ConnectionTrait,
        user_id: UserId,
    ) -> DbResult<(membership::Model, user::Model)> {
        let (m, u) = self
            .find::<membership::Entity>()
            .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
            .find_also_related(user::Entity)
            .one(conn)
            .await?
            .ok_or(Error::NotFound("member"))?;
        Ok((m, u.ok_or(Error::NotFound("member"))?))
    }

    pub async fn member(&self, user_id: UserId) -> Result<Member> {
        self.reading(Action::Read, async |txn| {
            let (m, u) = self.member_model(txn, user_id).await?;
            Ok(member_of(m, u).ok_or(Error::NotFound("member"))?)
        })
        .await
    }

    fn action_for_role(role: Role) -> Action {
        if role == Role::Owner {
            Action::ManageOwners
        } else {
            Action::ManageMembers
        }
    }

    /// Adds a user to the tenant, creating the account when the email is new (then a
    /// password hash is required).
    pub async fn add_member(
        &self,
        email: &str,
        role: Role,
        password_hash: Option<String>,
    ) -> Result<Member> {
        self.scoped(Self::action_for_role(role), async |txn| {
            let user = user_or_new(txn, email, password_hash, "password").await?;
            let created_at = now();
            membership::Entity::insert(membership::ActiveModel {
                tenant_id: Set(self.tenant_id().into()),
                user_id: Set(user.id.into()),
                role: Set(role.as_str().into()),
                created_at: Set(created_at),
            })
            .exec(txn)
            .await
            .map_err(conflict_as("this member"))?;
            self.audit(txn, "addMember", "user", user.id).await?;
            Ok(Member {
                user,
                tenant_id: self.tenant_id(),
                role,
                created_at,
            })
        })
        .await
    }

    async fn owner_count(&self, conn: &impl ConnectionTrait) -> DbResult<u64> {
        Ok(self
            .find::<membership::Entity>()
            .filter(membership::Column::Role.eq(Role::Owner.as_str()))
            .count(conn)
            .await?)
    }

    pub async fn set_member_role(&self, user_id: UserId, role: Role) -> Result<Member> {
        self.scoped(Self::action_for_role(role), async |txn| {
            let (m, u) = self.member_model(txn, user_id).await?;
            let current = Role::parse(&m.role).unwrap_or(Role::Viewer);
            self.require(Self::action_for_role(current)).await?;
            if current == Role::Owner && role != Role::Owner && self.owner_count(txn).await? <= 1 {
                Err(Error::Conflict("a tenant keeps at least one owner".into()))?;
            }
            membership::Entity::update_many()
                .col_expr(membership::Column::Role, Expr::value(role.as_str()))
                .filter(self.within::<membership::Entity>())
                .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
                .exec(txn)
                .await?;
            self.audit(txn, "setMemberRole", "user", user_id).await?;
            Ok(Member {
                user: u.into(),
                tenant_id: self.tenant_id(),
                role,
                created_at: m.created_at,
            })
        })
        .await
    }

    pub async fn remove_member(&self, user_id: UserId) -> Result<()> {
        self.scoped(Action::ManageMembers, async |txn| {
            let (m, _) = self.member_model(txn, user_id).await?;
            if m.role == Role::Owner.as_str() {
                self.require(Action::ManageOwners).await?;
                if self.owner_count(txn).await? <= 1 {
                    Err(Error::Conflict("a tenant keeps at least one owner".into()))?;
                }
            }
            membership::Entity::delete_many()
                .filter(self.within::<membership::Entity>())
                .filter(membership::Column::UserId.eq(Uuid::from(user_id)))
                .exec(txn)
                .await?;
            self.audit(txn, "removeMember", "user", user_id).await
        })
        .await
    }
}
