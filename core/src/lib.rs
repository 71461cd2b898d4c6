//! Domain types and rules of CloudTask. No IO lives here: typed ids, roles, tasks, runs
//! and their wire format, cron schedules, archive validation (on bytes in memory), the
//! configuration's keys, defaults and validation (the binary loads it), and the domain
//! error.

pub mod archive;
pub mod config;
pub mod error;
pub mod ids;
pub mod limits;
pub mod net;
pub mod protocol;
pub mod retention;
pub mod roles;
pub mod run;
pub mod schedule;
pub mod task;

pub use error::{Error, Result};
