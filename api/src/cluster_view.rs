//! The API's read-only view of live cluster state in ZooKeeper: which workers are up and
//! which worker owns a task. Nothing here writes.

use std::sync::Arc;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{CoordError, Coordinator, Session, SharedSession};
use cloudtask_core::ids::{ClusterId, TaskId};
use cloudtask_core::{Error, Result};

pub struct ClusterView {
    shared: SharedSession,
}

/// A worker as the cluster view sees it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: String,
    /// `None`: no live session, but assignments still name it (the scheduler is moving
    /// them).
    pub node: Option<WorkerNode>,
    pub assigned: u64,
}

fn unavailable(e: CoordError) -> Error {
    tracing::warn!(error = %e, "cluster view unavailable");
    Error::Unavailable("the coordination service")
}

async fn children_or_empty(session: &dyn Session, path: &str) -> Result<Vec<String>> {
    match session.children(path).await {
        Ok(children) => Ok(children),
        Err(CoordError::NoNode(_)) => Ok(Vec::new()),
        Err(e) => Err(unavailable(e)),
    }
}

impl ClusterView {
    pub fn new(coordinator: Arc<dyn Coordinator>) -> Self {
        ClusterView {
            shared: SharedSession::new(coordinator),
        }
    }

    async fn session(&self) -> Result<Arc<dyn Session>> {
        self.shared.get().await.map_err(unavailable)
    }

    async fn worker_info(
        &self,
        session: &dyn Session,
        cluster: ClusterId,
        name: &str,
    ) -> Result<WorkerInfo> {
        let path = layout::worker(cluster, name);
        let node = match session.get(&path).await.map_err(unavailable)? {
            Some(node) => layout::decode::<WorkerNode>(&path, &node.data).ok(),
            None => None,
        };
        let assigned = children_or_empty(session, &layout::worker_assignments(cluster, name))
            .await?
            .len() as u64;
        Ok(WorkerInfo {
            name: name.to_owned(),
            node,
            assigned,
        })
    }

    /// Live workers, and departed ones still holding assignments.
    pub async fn workers(&self, cluster: ClusterId) -> Result<Vec<WorkerInfo>> {
        let session = self.session().await?;
        let mut names = children_or_empty(session.as_ref(), &layout::workers(cluster)).await?;
        names.extend(children_or_empty(session.as_ref(), &layout::assignments(cluster)).await?);
        names.sort();
        names.dedup();
        let mut workers = Vec::with_capacity(names.len());
        for name in names {
            workers.push(self.worker_info(session.as_ref(), cluster, &name).await?);
        }
        Ok(workers)
    }

    /// The worker whose assignments hold the task, if any.
    pub async fn assigned_worker(
        &self,
        cluster: ClusterId,
        task: TaskId,
    ) -> Result<Option<WorkerInfo>> {
        let session = self.session().await?;
        for name in children_or_empty(session.as_ref(), &layout::assignments(cluster)).await? {
            if session
                .get(&layout::assignment(cluster, &name, task))
                .await
                .map_err(unavailable)?
                .is_some()
            {
                return Ok(Some(
                    self.worker_info(session.as_ref(), cluster, &name).await?,
                ));
            }
        }
        Ok(None)
    }

    /// Whether the task is assigned to this worker right now.
    pub async fn owns(&self, cluster: ClusterId, worker: &str, task: TaskId) -> Result<bool> {
        let session = self.session().await?;
        Ok(session
            .get(&layout::assignment(cluster, worker, task))
            .await
            .map_err(unavailable)?
            .is_some())
    }
}
