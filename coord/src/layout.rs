//! Every znode path and payload of CloudTask, in one place (DESIGN §2):
//!
//! ```text
//! /scheduler/election/n_…            EPHEMERAL_SEQUENTIAL; the lowest is the leader
//! /clusters/{cluster}                 persistent; ClusterNode
//!   /workers/{worker}                 EPHEMERAL; WorkerNode
//!   /tasks/{task}                     persistent; TaskNode (the mirrored spec)
//!   /assignments/{worker}/{task}      persistent; AssignmentNode, one child per task
//!   /commands/{worker}/c_…            PERSISTENT_SEQUENTIAL; CommandNode (the scheduler
//!                                     creates the worker's folder; the worker only reads
//!                                     and consumes)
//!   /departures/{worker}              persistent; written in the same batch that deletes a
//!                                     worker's node on a clean leave, so the scheduler tells
//!                                     a leave from a failure
//! ```
//!
//! Payloads are JSON: readable with `zkCli.sh get`, and far below `jute.maxbuffer`. Who
//! may touch each path: `acl`. No secret goes into the tree: a mirrored spec carries no
//! env values (see [`TaskNode::mirror`]).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{ClusterId, RunId, TaskId, TenantId, WorkerId};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::task::TaskSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{CoordError, Result};

pub const ELECTION: &str = "/scheduler/election";
pub const ELECTION_PREFIX: &str = "/scheduler/election/n_";
pub const CLUSTERS: &str = "/clusters";

pub fn join(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

pub fn cluster(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}")
}

pub fn workers(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}/workers")
}

pub fn worker(cluster: ClusterId, worker: &WorkerId) -> String {
    format!("{CLUSTERS}/{cluster}/workers/{worker}")
}

pub fn tasks(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}/tasks")
}

pub fn task(cluster: ClusterId, task: TaskId) -> String {
    format!("{CLUSTERS}/{cluster}/tasks/{task}")
}

pub fn assignments(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}/assignments")
}

pub fn worker_assignments(cluster: ClusterId, worker: &WorkerId) -> String {
    format!("{CLUSTERS}/{cluster}/assignments/{worker}")
}

pub fn assignment(cluster: ClusterId, worker: &WorkerId, task: TaskId) -> String {
    format!("{CLUSTERS}/{cluster}/assignments/{worker}/{task}")
}

pub fn commands_root(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}/commands")
}

pub fn commands(cluster: ClusterId, worker: &WorkerId) -> String {
    format!("{CLUSTERS}/{cluster}/commands/{worker}")
}

pub fn command_prefix(cluster: ClusterId, worker: &WorkerId) -> String {
    format!("{CLUSTERS}/{cluster}/commands/{worker}/c_")
}

pub fn departures(cluster: ClusterId) -> String {
    format!("{CLUSTERS}/{cluster}/departures")
}

pub fn departure(cluster: ClusterId, worker: &WorkerId) -> String {
    format!("{CLUSTERS}/{cluster}/departures/{worker}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub tenant: TenantId,
    pub name: String,
}

/// What a worker tells about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerNode {
    pub name: WorkerId,
    pub hostname: String,
    pub version: String,
    /// Relative weight on the allocation ring (>= 1).
    pub capacity: u32,
    #[serde(default)]
    pub labels: BTreeSet<String>,
    pub started_at: DateTime<Utc>,
    /// How it holds the processes of its runs (`cgroup-v1 (freezer, pids, …)`, …).
    #[serde(default)]
    pub containment: String,
}

/// A task as mirrored from the catalogue: what a worker needs to fire and run it, but
/// never its env values (the tenant's secrets): the worker gets those from the API with
/// the claim of each fire (`protocol::Claimed::env`), for the version it claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskNode {
    pub tenant: TenantId,
    pub name: String,
    pub version: u32,
    pub paused: bool,
    /// The spec with an empty env.
    pub spec: TaskSpec,
    /// The limits a run of it gets: the spec's, its cluster's defaults filled in.
    #[serde(default, skip_serializing_if = "RunLimits::is_empty")]
    pub limits: RunLimits,
}

impl TaskNode {
    /// The node mirroring `spec` at `version`, its env left out.
    pub fn mirror(
        tenant: TenantId,
        name: String,
        version: u32,
        paused: bool,
        spec: &TaskSpec,
    ) -> TaskNode {
        let spec = TaskSpec {
            env: Default::default(),
            ..spec.clone()
        };
        TaskNode {
            tenant,
            name,
            version,
            paused,
            spec,
            limits: RunLimits::default(),
        }
    }
}

/// Which worker owns a task; the task version the owner should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentNode {
    pub version: u32,
}

/// A request for one worker, delivered in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum CommandNode {
    RunNow { task: TaskId, run: RunId },
    Stop { run: RunId },
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("coordination payloads always serialise")
}

pub fn decode<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| CoordError::Other(format!("bad payload at {path}: {e}")))
}

/// Labels required by a task, from its spec.
pub fn required_labels(spec: &TaskSpec) -> BTreeSet<String> {
    spec.labels.iter().cloned().collect()
}

/// Parses sequential node names (`n_0000000042`) to their sequence number.
pub fn sequence_of(name: &str) -> Option<u64> {
    name.rsplit('_').next()?.parse().ok()
}

/// Children sorted by sequence number (ZooKeeper's names sort the same way, but
/// only while the counter stays within 10 digits: sorting by number is robust).
pub fn by_sequence(mut names: Vec<String>) -> Vec<String> {
    names.sort_by_key(|n| sequence_of(n).unwrap_or(u64::MAX));
    names
}
