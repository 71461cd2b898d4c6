//! The catalogue's one error type. A database error is classified once, where it is
//! converted (a unique violation is a conflict; the rest is internal, logged with its
//! detail and returned without it), so `?` works on every query. Public methods still
//! answer `cloudtask_core::Result`: the conversion happens at their boundary (the
//! scoped-transaction helpers).

use cloudtask_core::Error as DomainError;
use sea_orm::{DbErr, SqlErr};

/// A domain refusal, or a database failure already classified and logged.
#[derive(Debug)]
pub(crate) struct CatalogueError(DomainError);

/// What the catalogue's internal steps return.
pub(crate) type DbResult<T> = std::result::Result<T, CatalogueError>;

impl From<DbErr> for CatalogueError {
    fn from(e: DbErr) -> Self {
        if let Some(SqlErr::UniqueConstraintViolation(_)) = e.sql_err() {
            return CatalogueError(DomainError::Conflict("already exists".into()));
        }
        tracing::error!(error = %e, "catalogue query failed");
        CatalogueError(DomainError::internal(e))
    }
}

impl From<DomainError> for CatalogueError {
    fn from(e: DomainError) -> Self {
        CatalogueError(e)
    }
}

impl From<CatalogueError> for DomainError {
    fn from(e: CatalogueError) -> Self {
        e.0
    }
}

/// For a write whose unique violation has a meaning: "`what` already exists".
pub(crate) fn conflict_as(what: &str) -> impl FnOnce(DbErr) -> CatalogueError + '_ {
    move |e| match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => {
            CatalogueError(DomainError::Conflict(format!("{what} already exists")))
        }
        _ => e.into(),
    }
}
