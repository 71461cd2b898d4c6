//! The API's read-only view of live cluster state in ZooKeeper: which workers are up and
//! which worker owns a task. Nothing here writes.

use std::collections::HashSet;
use std::sync::Arc;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{CoordError, Coordinator, Session, SharedSession};
use cloudtask_core::ids::{ClusterId, TaskId, WorkerId};
use cloudtask_core::{Error, Result};

pub struct ClusterView {
    shared: SharedSession,
}

/// A worker as the cluster view sees it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub name: WorkerId,
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

/// The children of a folder named by worker (a node that names none is not a worker's).
async fn worker_children(session: &dyn Session, path: &str) -> Result<Vec<WorkerId>> {
    let children = children_or_empty(session, path).await?;
    Ok(children
        .into_iter()
        .filter_map(|c| c.parse().ok())
        .collect())
}

/// How long one look at the cluster may take. ZooKeeper operations wait while the
/// client reconnects; a request that needs the cluster view answers UNAVAILABLE rather
/// than hang with them (a claim then goes on without its ownership check).
const LOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ClusterView {
    /// A look bounded by `LOOK_TIMEOUT`; one that times out drops the session, so the
    /// next look starts on a new one.
    async fn bounded<T>(&self, look: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(LOOK_TIMEOUT, look).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("the cluster view timed out; reconnecting");
                self.shared.forget();
                Err(Error::Unavailable("the coordination service"))
            }
        }
    }

    /// Live workers, and departed ones still holding assignments.
    pub async fn workers(&self, cluster: ClusterId) -> Result<Vec<WorkerInfo>> {
        self.bounded(self.workers_now(cluster)).await
    }

    /// The worker whose assignments hold the task, if any.
    pub async fn assigned_worker(
        &self,
        cluster: ClusterId,
        task: TaskId,
    ) -> Result<Option<WorkerInfo>> {
        self.bounded(self.assigned_worker_now(cluster, task)).await
    }

    /// Which of `tasks` are assigned to this worker right now.
    pub async fn owned(
        &self,
        cluster: ClusterId,
        worker: &WorkerId,
        tasks: &[TaskId],
    ) -> Result<HashSet<TaskId>> {
        self.bounded(self.owned_now(cluster, worker, tasks)).await
    }

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
        name: &WorkerId,
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
            name: name.clone(),
            node,
            assigned,
        })
    }

    async fn workers_now(&self, cluster: ClusterId) -> Result<Vec<WorkerInfo>> {
        let session = self.session().await?;
        let mut names = worker_children(session.as_ref(), &layout::workers(cluster)).await?;
        names.extend(worker_children(session.as_ref(), &layout::assignments(cluster)).await?);
        names.sort();
        names.dedup();
        let mut workers = Vec::with_capacity(names.len());
        for name in names {
            workers.push(self.worker_info(session.as_ref(), cluster, &name).await?);
        }
        Ok(workers)
    }

    async fn assigned_worker_now(
        &self,
        cluster: ClusterId,
        task: TaskId,
    ) -> Result<Option<WorkerInfo>> {
        let session = self.session().await?;
        for name in worker_children(session.as_ref(), &layout::assignments(cluster)).await? {
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

    /// A few tasks are looked up one by one, many with one read of the worker's
    /// assignment folder.
    async fn owned_now(
        &self,
        cluster: ClusterId,
        worker: &WorkerId,
        tasks: &[TaskId],
    ) -> Result<HashSet<TaskId>> {
        const ONE_BY_ONE: usize = 4;
        let session = self.session().await?;
        if tasks.len() <= ONE_BY_ONE {
            let mut owned = HashSet::new();
            for task in tasks {
                if session
                    .get(&layout::assignment(cluster, worker, *task))
                    .await
                    .map_err(unavailable)?
                    .is_some()
                {
                    owned.insert(*task);
                }
            }
            return Ok(owned);
        }
        let assigned: HashSet<String> = children_or_empty(
            session.as_ref(),
            &layout::worker_assignments(cluster, worker),
        )
        .await?
        .into_iter()
        .collect();
        Ok(tasks
            .iter()
            .filter(|t| assigned.contains(&t.to_string()))
            .copied()
            .collect())
    }
}
