//! Domain types and rules of CloudTask. No IO lives here: ids, roles, schedules,
//! archive validation (on bytes in memory), configuration and the domain error.

pub mod archive;
pub mod config;
pub mod error;
pub mod ids;
pub mod protocol;
pub mod roles;
pub mod run;
pub mod schedule;
pub mod task;

pub use error::{Error, Result};
