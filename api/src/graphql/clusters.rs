//! Clusters and their workers: `clusters`, `cluster`, `createCluster`,
//! `rotateClusterToken`, `deleteCluster`, and `workerEvents` as workers join and leave.

use async_graphql::connection::Connection;
use async_graphql::{Context, Enum, ID, Object, SimpleObject, Subscription};
use chrono::{DateTime, Utc};
use cloudtask_catalogue::Cluster;
use cloudtask_catalogue::TaskFilter;
use cloudtask_catalogue::live_events::{Event, Membership};
use cloudtask_core::ids::{ClusterId, TenantId};
use futures_util::Stream;

use super::args::{connection, page_request, parse_id, parse_optional_id};
use super::limits::{RunLimitsInput, RunLimitsObj};
use super::tasks::TaskObj;
use super::{state, tenant};
use crate::auth::new_join_token;
use crate::error::{ApiError, ApiResult};

#[derive(Default)]
pub struct ClusterQuery;

#[Object]
impl ClusterQuery {
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
    async fn clusters(&self, ctx: &Context<'_>) -> ApiResult<Vec<ClusterObj>> {
        Ok(tenant(ctx)
            .await?
            .clusters()
            .await?
            .into_iter()
            .map(ClusterObj)
            .collect())
    }

    /// A cluster of the caller's tenant; any other id answers `NOT_FOUND`.
    async fn cluster(&self, ctx: &Context<'_>, id: ID) -> ApiResult<Option<ClusterObj>> {
        let handle = tenant(ctx).await?;
        Ok(Some(ClusterObj(
            handle.cluster(parse_id("id", &id)?).await?,
        )))
    }
}

#[derive(Default)]
pub struct ClusterMutation;

#[Object]
impl ClusterMutation {
    /// The join token is in the answer, once; only its hash is kept.
    async fn create_cluster(&self, ctx: &Context<'_>, name: String) -> ApiResult<ClusterWithToken> {
        let handle = tenant(ctx).await?;
        let (join_token, hash) = new_join_token();
        let cluster = handle.create_cluster(&name, hash).await?;
        Ok(ClusterWithToken {
            cluster: ClusterObj(cluster),
            join_token,
        })
    }

    /// Issues a new join token; the old one stops working at once.
    async fn rotate_cluster_token(&self, ctx: &Context<'_>, id: ID) -> ApiResult<ClusterWithToken> {
        let handle = tenant(ctx).await?;
        let (join_token, hash) = new_join_token();
        let cluster = handle
            .rotate_cluster_token(parse_id("id", &id)?, hash)
            .await?;
        Ok(ClusterWithToken {
            cluster: ClusterObj(cluster),
            join_token,
        })
    }

    /// Sets the limits the cluster's tasks' runs get where a task leaves one unset
    /// (replacing the previous defaults; omitted fields are unset). ADMIN and above.
    async fn set_cluster_limits(
        &self,
        ctx: &Context<'_>,
        id: ID,
        limits: RunLimitsInput,
    ) -> ApiResult<ClusterObj> {
        let cluster = tenant(ctx)
            .await?
            .set_cluster_default_limits(parse_id("id", &id)?, limits.into())
            .await?;
        Ok(ClusterObj(cluster))
    }

    /// Refused with CONFLICT while the cluster still has tasks.
    async fn delete_cluster(&self, ctx: &Context<'_>, id: ID) -> ApiResult<bool> {
        tenant(ctx)
            .await?
            .delete_cluster(parse_id("id", &id)?)
            .await?;
        Ok(true)
    }
}

#[derive(Default)]
pub struct ClusterSubscription;

#[Subscription]
impl ClusterSubscription {
    /// Workers of the tenant's clusters (or of one cluster) joining and leaving.
    async fn worker_events(
        &self,
        ctx: &Context<'_>,
        cluster_id: Option<ID>,
    ) -> Result<impl Stream<Item = WorkerEvent> + use<>, ApiError> {
        let handle = tenant(ctx).await?;
        // A member only: the events below are filtered by tenant, not read through the
        // handle.
        handle.role().await?;
        let cluster: Option<ClusterId> = parse_optional_id("clusterId", cluster_id.as_ref())?;
        if let Some(cluster) = cluster {
            handle.cluster(cluster).await?;
        }
        let tenant_id: TenantId = handle.tenant_id();
        let events = state(ctx).catalogue.events().await?;
        Ok(futures_util::stream::unfold(
            events,
            move |mut events| async move {
                loop {
                    if let Event::Worker {
                        tenant,
                        cluster: of_cluster,
                        change,
                        worker,
                    } = events.next().await?
                        && tenant == tenant_id
                        && cluster.is_none_or(|c| c == of_cluster)
                    {
                        let event = WorkerEvent {
                            cluster_id: ID(of_cluster.to_string()),
                            worker: worker.into(),
                            kind: change.into(),
                            at: Utc::now(),
                        };
                        return Some((event, events));
                    }
                }
            },
        ))
    }
}

pub struct ClusterObj(pub Cluster);

#[Object(name = "Cluster")]
impl ClusterObj {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// When the join token was last issued.
    /// What its tasks' runs get for the limits they leave unset.
    async fn default_limits(&self) -> RunLimitsObj {
        self.0.default_limits.into()
    }
    async fn token_rotated_at(&self) -> DateTime<Utc> {
        self.0.token_rotated_at
    }
    /// Live workers (and departed ones still holding assignments), from the cluster's
    /// coordination state.
    #[graphql(complexity = "super::cost::UNSIZED_LIST.saturating_mul(child_complexity.max(1))")]
    async fn workers(&self, ctx: &Context<'_>) -> ApiResult<Vec<WorkerObj>> {
        let workers = state(ctx).cluster_view.workers(self.0.id).await?;
        Ok(workers.into_iter().map(WorkerObj).collect())
    }
    #[graphql(complexity = "super::cost::list(first, super::args::DEFAULT_PAGE, child_complexity)")]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> ApiResult<Connection<String, TaskObj>> {
        let request = page_request(first, after)?;
        let filter = TaskFilter {
            cluster_id: Some(self.0.id),
            ..TaskFilter::default()
        };
        let page = tenant(ctx).await?.tasks(&filter, request).await?;
        Ok(connection(page, request, |t| t.id.into(), TaskObj::from))
    }
}

/// A cluster with its join token. The token is shown here once and stored hashed.
#[derive(SimpleObject)]
pub struct ClusterWithToken {
    pub cluster: ClusterObj,
    pub join_token: String,
}

/// A worker of a cluster.
pub struct WorkerObj(pub crate::cluster_view::WorkerInfo);

#[Object(name = "Worker")]
impl WorkerObj {
    /// The worker's name, unique in its cluster.
    async fn id(&self) -> ID {
        ID(self.0.name.to_string())
    }
    async fn name(&self) -> &str {
        self.0.name.as_str()
    }
    async fn hostname(&self) -> Option<&str> {
        self.0.node.as_ref().map(|n| n.hostname.as_str())
    }
    /// Whether it holds a live session now.
    async fn online(&self) -> bool {
        self.0.node.is_some()
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.0.node.as_ref().map(|n| n.started_at)
    }
    /// Liveness is the coordination session: an online worker is seen now.
    async fn last_seen_at(&self) -> Option<DateTime<Utc>> {
        self.0.node.as_ref().map(|_| Utc::now())
    }
    async fn version(&self) -> Option<&str> {
        self.0.node.as_ref().map(|n| n.version.as_str())
    }
    async fn capacity(&self) -> Option<u32> {
        self.0.node.as_ref().map(|n| n.capacity)
    }
    async fn labels(&self) -> Vec<String> {
        self.0
            .node
            .as_ref()
            .map(|n| n.labels.iter().cloned().collect())
            .unwrap_or_default()
    }
    async fn assigned_task_count(&self) -> u64 {
        self.0.assigned
    }
    /// How it holds every process of a run and enforces limits, as it detected at its
    /// start: `cgroup-v1 (freezer, pids, memory, cpu)`, `cgroup-v2 (kill, …)` or
    /// `process-tree (…)` (no cgroups: memory and process limits held by the worker
    /// sampling `/proc`, no CPU limit).
    async fn containment(&self) -> Option<&str> {
        self.0
            .node
            .as_ref()
            .map(|n| n.containment.as_str())
            .filter(|c| !c.is_empty())
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "WorkerEventKind")]
pub enum WorkerEventKind {
    Joined,
    /// Left cleanly (shut down).
    Left,
    /// Its session ended without a clean leave; its tasks moved.
    Offline,
}

impl From<Membership> for WorkerEventKind {
    fn from(m: Membership) -> Self {
        match m {
            Membership::Joined => WorkerEventKind::Joined,
            Membership::Left => WorkerEventKind::Left,
            Membership::Offline => WorkerEventKind::Offline,
        }
    }
}

/// A worker joined or left its cluster.
#[derive(SimpleObject)]
pub struct WorkerEvent {
    pub cluster_id: ID,
    /// The worker's name, unique in its cluster.
    pub worker: String,
    pub kind: WorkerEventKind,
    /// When this API heard of it.
    pub at: DateTime<Utc>,
}
