//! Packages: inspected archives, stored content-addressed (sha256) per tenant. Users
//! upload them with a task write; a worker fetches one only if a task of its cluster
//! uses it.

use chrono::{DateTime, Utc};
use cloudtask_core::archive::ArchiveSummary;
use cloudtask_core::roles::Action;
use cloudtask_core::{Error, Result};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};

use crate::entities::package;
use crate::error::DbResult;
use crate::{ClusterHandle, TenantHandle, now};

#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    pub sha256: String,
    pub format: String,
    pub size_bytes: u64,
    pub unpacked_bytes: u64,
    pub entries: u64,
    pub created_at: DateTime<Utc>,
}

/// An inspected archive to store with a task write, content-addressed by its sha256.
#[derive(Debug, Clone)]
pub struct NewPackage {
    pub sha256: String,
    pub summary: ArchiveSummary,
    pub content: Vec<u8>,
}

impl TenantHandle {
    /// Stores an inspected archive unless the tenant already holds the same bytes.
    pub(crate) async fn insert_package(
        &self,
        conn: &impl ConnectionTrait,
        package: NewPackage,
    ) -> DbResult<()> {
        package::Entity::insert(package::ActiveModel {
            tenant_id: Set(self.tenant_id().into()),
            sha256: Set(package.sha256.clone()),
            format: Set(package.summary.format.as_str().into()),
            size_bytes: Set(package.content.len() as i64),
            unpacked_bytes: Set(package.summary.unpacked_bytes as i64),
            entries: Set(package.summary.entries as i64),
            content: Set(package.content),
            created_at: Set(now()),
        })
        .on_conflict_do_nothing_on([package::Column::TenantId, package::Column::Sha256])
        .exec(conn)
        .await?;
        Ok(())
    }

    /// What the tenant's package is, without its bytes.
    pub async fn package(&self, sha256: &str) -> Result<PackageInfo> {
        self.reading(Action::Read, async |txn| {
            let found = self
                .find::<package::Entity>()
                .filter(package::Column::Sha256.eq(sha256))
                .select_only()
                .columns([
                    package::Column::Sha256,
                    package::Column::Format,
                    package::Column::SizeBytes,
                    package::Column::UnpackedBytes,
                    package::Column::Entries,
                    package::Column::CreatedAt,
                ])
                .into_tuple::<(String, String, i64, i64, i64, DateTime<Utc>)>()
                .one(txn)
                .await?;
            let (sha256, format, size, unpacked, entries, created_at) =
                found.ok_or(Error::NotFound("package"))?;
            Ok(PackageInfo {
                sha256,
                format,
                size_bytes: size as u64,
                unpacked_bytes: unpacked as u64,
                entries: entries as u64,
                created_at,
            })
        })
        .await
    }

    pub async fn package_content(&self, sha256: &str) -> Result<Vec<u8>> {
        self.reading(Action::Read, async |txn| {
            let found = self
                .find::<package::Entity>()
                .filter(package::Column::Sha256.eq(sha256))
                .one(txn)
                .await?;
            Ok(found.map(|p| p.content).ok_or(Error::NotFound("package"))?)
        })
        .await
    }
}

impl ClusterHandle {
    /// A package's bytes, if a task of this cluster uses it.
    pub async fn package_content(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        self.reading(async |txn| {
            let found = self
                .find::<package::Entity>()
                .filter(package::Column::Sha256.eq(sha256))
                .one(txn)
                .await?;
            Ok(found.map(|p| p.content))
        })
        .await
    }
}
