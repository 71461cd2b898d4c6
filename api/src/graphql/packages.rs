//! Task programs: `uploadPackage`, the `Package` object, and how an uploaded archive is
//! read and inspected before the catalogue stores it.

use async_graphql::{Context, ID, Object, Upload};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::NewPackage;
use cloudtask_catalogue::PackageInfo;
use cloudtask_core::archive::{self, Limits};
use cloudtask_core::ids::TaskId;
use cloudtask_core::{Error, Result};
use sha2::{Digest, Sha256};

use super::args::parse_id;
use super::tasks::TaskObj;
use super::{state, tenant};
use crate::error::ApiResult;

#[derive(Default)]
pub struct PackageMutation;

#[Object]
impl PackageMutation {
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
}

/// Reads an uploaded archive and inspects it (off the async runtime: it decompresses).
pub async fn read_package(ctx: &Context<'_>, field: &str, upload: &Upload) -> Result<NewPackage> {
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

pub struct PackageObj(pub PackageInfo);

#[Object(name = "Package")]
impl PackageObj {
    async fn sha256(&self) -> &str {
        &self.0.sha256
    }
    /// `zip` or `tar.gz`.
    async fn format(&self) -> &str {
        &self.0.format
    }
    async fn size_bytes(&self) -> u64 {
        self.0.size_bytes
    }
    async fn unpacked_bytes(&self) -> u64 {
        self.0.unpacked_bytes
    }
    async fn entries(&self) -> u64 {
        self.0.entries
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// Where the archive can be downloaded with the same bearer token.
    async fn download_path(&self) -> String {
        format!("/packages/{}", self.0.sha256)
    }
}
