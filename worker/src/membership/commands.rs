//! Commands for this worker (run now, stop), read on the session that reads its
//! assignments. Each batch is handed to the engine only after the assignments have been
//! read again and published: the scheduler writes a task's spec and assignment before
//! any command naming it, and a session never reads older state than it has read, so
//! the assignments the engine holds when it takes a command are at least as new as the
//! command (a task missing from them has moved on; the scheduler hands its run on).

use cloudtask_coord::CoordError;
use cloudtask_coord::layout::{self, CommandNode};

use super::session::{Live, WatchFuture};
use super::{Stop, publish};

impl Live<'_> {
    /// Hands this worker's commands to the engine in sequence order, then deletes them.
    /// Returns the watch on the command folder and, when commands were handed over, the
    /// watch of the assignments read for them (it replaces the one armed before).
    pub(super) async fn deliver_commands(
        &mut self,
    ) -> Result<(WatchFuture, Option<WatchFuture>), Stop> {
        let Some(engine) = self.membership.commands.clone() else {
            return Ok((Box::pin(std::future::pending()), None));
        };
        let session = self.session;
        let dir = layout::commands(self.membership.cluster, &self.membership.me.name);
        // The scheduler creates our folder with our first command; until then, watch
        // for its creation (we may not create it: see `acl`).
        let (names, watch) = loop {
            match self.call(|| session.children_and_watch(&dir)).await {
                Ok(listed) => break listed,
                Err(Stop::Failed(CoordError::NoNode(_))) => {
                    let (folder, watch) = self.call(|| session.get_and_watch(&dir)).await?;
                    if folder.is_none() {
                        return Ok((Box::pin(watch.fired()), None));
                    }
                    // Created in between: list it.
                }
                Err(stop) => return Err(stop),
            }
        };
        let watch: WatchFuture = Box::pin(watch.fired());
        if names.is_empty() {
            return Ok((watch, None));
        }
        let mut commands = Vec::new();
        let mut paths = Vec::new();
        for name in layout::by_sequence(names) {
            let path = layout::join(&dir, &name);
            if let Some(node) = self.call(|| session.get(&path)).await? {
                match layout::decode::<CommandNode>(&path, &node.data) {
                    Ok(command) => commands.push(command),
                    Err(e) => tracing::warn!(error = %e, "ignoring a bad command"),
                }
            }
            paths.push(path);
        }
        let (tasks, assigned) = self.read_assignments().await?;
        publish(self.assignments, self.epoch, tasks);
        for command in commands {
            let _ = engine.send(command);
        }
        for path in paths {
            match self.call(|| session.delete(&path, None)).await {
                Ok(()) | Err(Stop::Failed(CoordError::NoNode(_))) => {}
                Err(stop) => return Err(stop),
            }
        }
        Ok((watch, Some(assigned)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use cloudtask_coord::memory::{MemoryCoordinator, MemorySession};
    use cloudtask_coord::{Coordinator, Node, NodeKind, Op, Session, SessionState, Watch};
    use cloudtask_core::ids::{ClusterId, RunId, TaskId};
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::membership::{Assignments, Membership, MembershipStatus};

    const WAIT: Duration = Duration::from_secs(10);

    /// In-memory sessions whose watches on the assignment folders never fire: membership
    /// hears of an assignment only by reading again, as when its watch event is late.
    struct LateAssignmentWatches(MemoryCoordinator);

    struct Late(Arc<MemorySession>);

    impl Late {
        fn deaf(path: &str, watch: Watch) -> Watch {
            if path.contains("/assignments/") {
                Watch::new(std::future::pending())
            } else {
                watch
            }
        }
    }

    #[async_trait::async_trait]
    impl Coordinator for LateAssignmentWatches {
        async fn connect(&self) -> cloudtask_coord::Result<Arc<dyn Session>> {
            Ok(Arc::new(Late(self.0.connect_memory())))
        }
        fn access(&self) -> &cloudtask_coord::Access {
            self.0.access()
        }
        fn with_access(&self, access: cloudtask_coord::Access) -> Arc<dyn Coordinator> {
            Arc::new(LateAssignmentWatches(self.0.as_access(access)))
        }
    }

    #[async_trait::async_trait]
    impl Session for Late {
        async fn create(
            &self,
            path: &str,
            data: &[u8],
            kind: NodeKind,
        ) -> cloudtask_coord::Result<String> {
            self.0.create(path, data, kind).await
        }
        async fn ensure_path(&self, path: &str) -> cloudtask_coord::Result<()> {
            self.0.ensure_path(path).await
        }
        async fn get(&self, path: &str) -> cloudtask_coord::Result<Option<Node>> {
            self.0.get(path).await
        }
        async fn get_and_watch(
            &self,
            path: &str,
        ) -> cloudtask_coord::Result<(Option<Node>, Watch)> {
            let (node, watch) = self.0.get_and_watch(path).await?;
            Ok((node, Late::deaf(path, watch)))
        }
        async fn set(
            &self,
            path: &str,
            data: &[u8],
            version: Option<i32>,
        ) -> cloudtask_coord::Result<i32> {
            self.0.set(path, data, version).await
        }
        async fn delete(&self, path: &str, version: Option<i32>) -> cloudtask_coord::Result<()> {
            self.0.delete(path, version).await
        }
        async fn children(&self, path: &str) -> cloudtask_coord::Result<Vec<String>> {
            self.0.children(path).await
        }
        async fn children_and_watch(
            &self,
            path: &str,
        ) -> cloudtask_coord::Result<(Vec<String>, Watch)> {
            let (names, watch) = self.0.children_and_watch(path).await?;
            Ok((names, Late::deaf(path, watch)))
        }
        async fn multi(&self, ops: Vec<Op>) -> cloudtask_coord::Result<()> {
            self.0.multi(ops).await
        }
        async fn acl(&self, path: &str) -> cloudtask_coord::Result<Vec<cloudtask_coord::Grant>> {
            self.0.acl(path).await
        }
        async fn set_acl(
            &self,
            path: &str,
            acl: &[cloudtask_coord::Grant],
        ) -> cloudtask_coord::Result<()> {
            self.0.set_acl(path, acl).await
        }
        fn state(&self) -> watch::Receiver<SessionState> {
            self.0.state()
        }
        async fn close(&self) {
            self.0.close().await
        }
    }

    fn me() -> layout::WorkerNode {
        layout::WorkerNode {
            name: "w1".parse().unwrap(),
            hostname: "test-host".into(),
            version: "0".into(),
            capacity: 1,
            labels: Default::default(),
            started_at: chrono::Utc::now(),
            containment: String::new(),
        }
    }

    /// The scheduler's order (the assignment, then a command naming its task): the
    /// command is handed over after assignments that hold the task are published, even
    /// when the assignment's watch event has not come; commands go in sequence order and
    /// are deleted once handed over.
    #[tokio::test]
    async fn a_command_is_handed_over_after_the_assignment_written_before_it() {
        let service = Arc::new(LateAssignmentWatches(MemoryCoordinator::new()));
        let scheduler = service.0.connect_memory();
        let cluster = ClusterId::new();
        let (commands_tx, mut commands) = mpsc::unbounded_channel();
        let membership =
            Membership::new(service.clone(), cluster, me()).deliver_commands(commands_tx);
        let mut status = membership.status();
        let (assignments_tx, assignments) = watch::channel(Assignments::default());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(membership.run(assignments_tx, shutdown.clone()));
        let registered = status.wait_for(|s| matches!(s, MembershipStatus::Registered { .. }));
        tokio::time::timeout(WAIT, registered)
            .await
            .unwrap()
            .unwrap();

        let dir = layout::commands(cluster, &"w1".parse().unwrap());
        scheduler.ensure_path(&dir).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let (task, run) = (TaskId::new(), RunId::new());
            held.push(task);
            scheduler
                .ensure_path(&layout::assignment(cluster, &"w1".parse().unwrap(), task))
                .await
                .unwrap();
            for command in [CommandNode::RunNow { task, run }, CommandNode::Stop { run }] {
                let prefix = layout::command_prefix(cluster, &"w1".parse().unwrap());
                let data = layout::encode(&command);
                let kind = NodeKind::PersistentSequential;
                scheduler.create(&prefix, &data, kind).await.unwrap();
            }
            let first = tokio::time::timeout(WAIT, commands.recv()).await.unwrap();
            assert_eq!(first, Some(CommandNode::RunNow { task, run }));
            let published = assignments.borrow().tasks.clone();
            assert_eq!(
                published,
                held.iter().copied().collect(),
                "handed over too early"
            );
            let second = tokio::time::timeout(WAIT, commands.recv()).await.unwrap();
            assert_eq!(second, Some(CommandNode::Stop { run }));
            let emptied = async {
                loop {
                    let (names, watch) = scheduler.children_and_watch(&dir).await.unwrap();
                    if names.is_empty() {
                        return;
                    }
                    watch.fired().await;
                }
            };
            tokio::time::timeout(WAIT, emptied).await.unwrap();
        }
        shutdown.cancel();
        running.await.unwrap().unwrap();
    }
}
