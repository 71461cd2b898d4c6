//! An in-memory coordination service with ZooKeeper's semantics where CloudTask relies on
//! them: sessions that own ephemeral nodes, sequential names, versions, one-shot watches,
//! atomic batches, expiry, and ACLs: a session authenticates as its [`Access`]'s
//! credential, creates nodes with the ACL its policy gives the path, and is refused
//! (`NoAuth`) where ZooKeeper would refuse it. For unit tests and the standalone mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::acl::{Access, Grant, Perms};
use crate::{
    CoordError, Coordinator, Node, NodeKind, Op, Result, Session, SessionState, Version, Watch,
    WatchEvent,
};

#[derive(Debug, Clone)]
struct Entry {
    data: Vec<u8>,
    version: Version,
    owner: Option<u64>,
    next_sequence: u64,
    acl: Vec<Grant>,
}

type Waiters = Vec<(u64, oneshot::Sender<WatchEvent>)>;

#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Entry>,
    data_watches: HashMap<String, Waiters>,
    child_watches: HashMap<String, Waiters>,
    live_sessions: HashMap<u64, watch::Sender<SessionState>>,
}

/// The shared service. Clone it to hand out sessions to several components.
#[derive(Clone, Default)]
pub struct MemoryCoordinator {
    tree: Arc<Mutex<Tree>>,
    next_session: Arc<AtomicU64>,
    access: Access,
}

pub struct MemorySession {
    id: u64,
    tree: Arc<Mutex<Tree>>,
    state: watch::Receiver<SessionState>,
    access: Access,
    /// The digest ids this session authenticated as.
    digests: Vec<String>,
}

/// Who is asking, for the ACL checks of one operation.
struct Caller<'a> {
    session: u64,
    access: &'a Access,
    digests: &'a [String],
}

fn allowed(entry: &Entry, caller: &Caller, perm: Perms) -> bool {
    entry.acl.iter().any(|g| g.allows(caller.digests, perm))
}

fn parent_of(path: &str) -> Option<&str> {
    let idx = path.rfind('/')?;
    Some(if idx == 0 { "/" } else { &path[..idx] })
}

fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || (path.len() > 1 && path.ends_with('/')) || path.contains("//") {
        return Err(CoordError::Other(format!("invalid path {path:?}")));
    }
    Ok(())
}

fn fire(waiters: Option<Waiters>, event: WatchEvent) {
    for (_, tx) in waiters.into_iter().flatten() {
        let _ = tx.send(event);
    }
}

impl Tree {
    fn new_root() -> Tree {
        let mut tree = Tree::default();
        tree.nodes.insert(
            "/".into(),
            Entry {
                data: vec![],
                version: 0,
                owner: None,
                next_sequence: 0,
                acl: vec![Grant::anyone_all()],
            },
        );
        tree
    }

    fn children_of(&self, path: &str) -> Vec<String> {
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/') && k.len() > prefix.len())
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect()
    }

    /// Whether `op` may apply, in ZooKeeper's order: the node (or the parent) exists,
    /// the caller has the right, then versions and children.
    fn check(&self, op: &Op, caller: &Caller) -> Result<()> {
        match op {
            Op::Create { path, .. } => {
                check_path(path)?;
                let parent = parent_of(path).ok_or_else(|| CoordError::Other("root".into()))?;
                let parent_entry = self
                    .nodes
                    .get(parent)
                    .ok_or_else(|| CoordError::NoNode(parent.into()))?;
                if !allowed(parent_entry, caller, Perms::CREATE) {
                    return Err(CoordError::NoAuth(path.clone()));
                }
                if parent_entry.owner.is_some() {
                    return Err(CoordError::Other(format!("{parent} is ephemeral")));
                }
                Ok(())
            }
            Op::Set { path, version, .. } | Op::Delete { path, version } => {
                let entry = self
                    .nodes
                    .get(path)
                    .ok_or_else(|| CoordError::NoNode(path.clone()))?;
                let permitted = match op {
                    Op::Delete { .. } => parent_of(path)
                        .and_then(|parent| self.nodes.get(parent))
                        .is_some_and(|parent| allowed(parent, caller, Perms::DELETE)),
                    _ => allowed(entry, caller, Perms::WRITE),
                };
                if !permitted {
                    return Err(CoordError::NoAuth(path.clone()));
                }
                if version.is_some_and(|v| v != entry.version) {
                    return Err(CoordError::BadVersion(path.clone()));
                }
                if matches!(op, Op::Delete { .. }) && !self.children_of(path).is_empty() {
                    return Err(CoordError::NotEmpty(path.clone()));
                }
                Ok(())
            }
            Op::Check { path, version } => {
                let entry = self
                    .nodes
                    .get(path)
                    .ok_or_else(|| CoordError::NoNode(path.clone()))?;
                if entry.version != *version {
                    return Err(CoordError::BadVersion(path.clone()));
                }
                Ok(())
            }
        }
    }

    /// Applies a checked op; returns the created path for creates.
    fn apply(&mut self, caller: &Caller, op: Op) -> Result<String> {
        let session = caller.session;
        match op {
            Op::Create { path, data, kind } => {
                let acl = caller.access.acl_for(&path);
                let parent = parent_of(&path).expect("checked").to_owned();
                let path = match kind {
                    NodeKind::PersistentSequential | NodeKind::EphemeralSequential => {
                        let entry = self.nodes.get_mut(&parent).expect("checked");
                        let n = entry.next_sequence;
                        entry.next_sequence += 1;
                        format!("{path}{n:010}")
                    }
                    _ => path,
                };
                if self.nodes.contains_key(&path) {
                    return Err(CoordError::NodeExists(path));
                }
                let owner = matches!(kind, NodeKind::Ephemeral | NodeKind::EphemeralSequential)
                    .then_some(session);
                self.nodes.insert(
                    path.clone(),
                    Entry {
                        data,
                        version: 0,
                        owner,
                        next_sequence: 0,
                        acl,
                    },
                );
                fire(self.data_watches.remove(&path), WatchEvent::Created);
                fire(
                    self.child_watches.remove(&parent),
                    WatchEvent::ChildrenChanged,
                );
                Ok(path)
            }
            Op::Set { path, data, .. } => {
                let entry = self.nodes.get_mut(&path).expect("checked");
                entry.data = data;
                entry.version += 1;
                fire(self.data_watches.remove(&path), WatchEvent::DataChanged);
                Ok(path)
            }
            Op::Delete { path, .. } => {
                self.remove(&path);
                Ok(path)
            }
            Op::Check { path, .. } => Ok(path),
        }
    }

    fn remove(&mut self, path: &str) {
        self.nodes.remove(path);
        fire(self.data_watches.remove(path), WatchEvent::Deleted);
        fire(self.child_watches.remove(path), WatchEvent::Deleted);
        if let Some(parent) = parent_of(path) {
            fire(
                self.child_watches.remove(parent),
                WatchEvent::ChildrenChanged,
            );
        }
    }

    fn end_session(&mut self, session: u64, state: SessionState) {
        let owned: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.owner == Some(session))
            .map(|(k, _)| k.clone())
            .collect();
        for path in owned {
            self.remove(&path);
        }
        for waiters in self
            .data_watches
            .values_mut()
            .chain(self.child_watches.values_mut())
        {
            let (mine, others): (Waiters, Waiters) =
                waiters.drain(..).partition(|(s, _)| *s == session);
            *waiters = others;
            fire(Some(mine), WatchEvent::SessionEnded);
        }
        if let Some(tx) = self.live_sessions.remove(&session) {
            let _ = tx.send(state);
        }
    }
}

impl MemoryCoordinator {
    /// An empty service, reached anonymously on an open tree ([`Access::open`]).
    pub fn new() -> Self {
        MemoryCoordinator {
            tree: Arc::new(Mutex::new(Tree::new_root())),
            next_session: Arc::default(),
            access: Access::open(),
        }
    }

    /// The same service, reached as `access` (kept concrete for tests that expire).
    pub fn as_access(&self, access: Access) -> MemoryCoordinator {
        MemoryCoordinator {
            access,
            ..self.clone()
        }
    }

    /// Ends a session as the server would after its timeout: its ephemeral nodes vanish
    /// and its holder sees `Expired`.
    pub fn expire(&self, session: &MemorySession) {
        self.tree
            .lock()
            .expect("tree")
            .end_session(session.id, SessionState::Expired);
    }

    /// A session as a concrete type, for tests that expire it.
    pub fn connect_memory(&self) -> Arc<MemorySession> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = watch::channel(SessionState::Connected);
        self.tree.lock().expect("tree").live_sessions.insert(id, tx);
        Arc::new(MemorySession {
            id,
            tree: self.tree.clone(),
            state: rx,
            digests: self.access.digests(),
            access: self.access.clone(),
        })
    }
}

#[async_trait::async_trait]
impl Coordinator for MemoryCoordinator {
    async fn connect(&self) -> Result<Arc<dyn Session>> {
        Ok(self.connect_memory())
    }

    fn access(&self) -> &Access {
        &self.access
    }

    fn with_access(&self, access: Access) -> Arc<dyn Coordinator> {
        Arc::new(self.as_access(access))
    }
}

impl MemorySession {
    fn caller(&self) -> Caller<'_> {
        Caller {
            session: self.id,
            access: &self.access,
            digests: &self.digests,
        }
    }

    /// The node, when it exists and the caller may read it.
    fn readable<'t>(&self, tree: &'t Tree, path: &str) -> Result<Option<&'t Entry>> {
        match tree.nodes.get(path) {
            Some(entry) if !allowed(entry, &self.caller(), Perms::READ) => {
                Err(CoordError::NoAuth(path.into()))
            }
            found => Ok(found),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tree>> {
        let tree = self.tree.lock().expect("tree");
        if !tree.live_sessions.contains_key(&self.id) {
            return Err(CoordError::SessionExpired);
        }
        Ok(tree)
    }

    fn watcher(tree: &mut Tree, session: u64, path: &str, children: bool) -> Watch {
        let (tx, rx) = oneshot::channel();
        let map = if children {
            &mut tree.child_watches
        } else {
            &mut tree.data_watches
        };
        map.entry(path.to_owned()).or_default().push((session, tx));
        Watch::new(async move { rx.await.unwrap_or(WatchEvent::SessionEnded) })
    }
}

#[async_trait::async_trait]
impl Session for MemorySession {
    async fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<String> {
        let mut tree = self.lock()?;
        let op = Op::Create {
            path: path.into(),
            data: data.to_vec(),
            kind,
        };
        tree.check(&op, &self.caller())?;
        tree.apply(&self.caller(), op)
    }

    async fn ensure_path(&self, path: &str) -> Result<()> {
        check_path(path)?;
        let mut tree = self.lock()?;
        let mut current = String::new();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            current.push('/');
            current.push_str(segment);
            if !tree.nodes.contains_key(&current) {
                let op = Op::Create {
                    path: current.clone(),
                    data: vec![],
                    kind: NodeKind::Persistent,
                };
                tree.check(&op, &self.caller())?;
                tree.apply(&self.caller(), op)?;
            }
        }
        Ok(())
    }

    async fn get(&self, path: &str) -> Result<Option<Node>> {
        let tree = self.lock()?;
        Ok(self.readable(&tree, path)?.map(|e| Node {
            data: e.data.clone(),
            version: e.version,
        }))
    }

    async fn get_and_watch(&self, path: &str) -> Result<(Option<Node>, Watch)> {
        let mut tree = self.lock()?;
        let node = self.readable(&tree, path)?.map(|e| Node {
            data: e.data.clone(),
            version: e.version,
        });
        let watch = Self::watcher(&mut tree, self.id, path, false);
        Ok((node, watch))
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<Version>) -> Result<Version> {
        let mut tree = self.lock()?;
        let op = Op::Set {
            path: path.into(),
            data: data.to_vec(),
            version,
        };
        tree.check(&op, &self.caller())?;
        tree.apply(&self.caller(), op)?;
        Ok(tree.nodes[path].version)
    }

    async fn delete(&self, path: &str, version: Option<Version>) -> Result<()> {
        let mut tree = self.lock()?;
        let op = Op::Delete {
            path: path.into(),
            version,
        };
        tree.check(&op, &self.caller())?;
        tree.apply(&self.caller(), op).map(|_| ())
    }

    async fn children(&self, path: &str) -> Result<Vec<String>> {
        let tree = self.lock()?;
        if self.readable(&tree, path)?.is_none() {
            return Err(CoordError::NoNode(path.into()));
        }
        Ok(tree.children_of(path))
    }

    async fn children_and_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        let mut tree = self.lock()?;
        if self.readable(&tree, path)?.is_none() {
            return Err(CoordError::NoNode(path.into()));
        }
        let children = tree.children_of(path);
        let watch = Self::watcher(&mut tree, self.id, path, true);
        Ok((children, watch))
    }

    async fn multi(&self, ops: Vec<Op>) -> Result<()> {
        let mut tree = self.lock()?;
        // Check against a scratch copy so that a later op may depend on an earlier one
        // (create a parent, then its child) and a failure leaves nothing applied.
        let mut scratch = Tree {
            nodes: tree.nodes.clone(),
            ..Tree::default()
        };
        let caller = self.caller();
        for op in &ops {
            scratch.check(op, &caller)?;
            scratch.apply(&caller, op.clone())?;
        }
        for op in ops {
            tree.apply(&caller, op)?;
        }
        Ok(())
    }

    async fn acl(&self, path: &str) -> Result<Vec<Grant>> {
        let tree = self.lock()?;
        let entry = tree
            .nodes
            .get(path)
            .ok_or_else(|| CoordError::NoNode(path.into()))?;
        Ok(entry.acl.clone())
    }

    async fn set_acl(&self, path: &str, acl: &[Grant]) -> Result<()> {
        let mut tree = self.lock()?;
        let caller = self.caller();
        let entry = tree
            .nodes
            .get_mut(path)
            .ok_or_else(|| CoordError::NoNode(path.into()))?;
        if !allowed(entry, &caller, Perms::ADMIN) {
            return Err(CoordError::NoAuth(path.into()));
        }
        entry.acl = acl.to_vec();
        Ok(())
    }

    fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    async fn close(&self) {
        self.tree
            .lock()
            .expect("tree")
            .end_session(self.id, SessionState::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ephemerals_vanish_with_their_session_and_watches_fire() {
        let service = MemoryCoordinator::new();
        let worker = service.connect_memory();
        let observer = service.connect_memory();
        worker.ensure_path("/c/workers").await.unwrap();
        worker
            .create("/c/workers/w1", b"{}", NodeKind::Ephemeral)
            .await
            .unwrap();
        let (children, watch) = observer.children_and_watch("/c/workers").await.unwrap();
        assert_eq!(children, vec!["w1".to_string()]);
        service.expire(&worker);
        assert_eq!(watch.fired().await, WatchEvent::ChildrenChanged);
        assert!(observer.children("/c/workers").await.unwrap().is_empty());
        assert_eq!(*worker.state().borrow(), SessionState::Expired);
        assert_eq!(worker.get("/c").await, Err(CoordError::SessionExpired));
    }

    #[tokio::test]
    async fn sequential_versions_and_atomic_batches() {
        let service = MemoryCoordinator::new();
        let s = service.connect_memory();
        s.ensure_path("/e").await.unwrap();
        let a = s
            .create("/e/n_", b"", NodeKind::EphemeralSequential)
            .await
            .unwrap();
        let b = s
            .create("/e/n_", b"", NodeKind::EphemeralSequential)
            .await
            .unwrap();
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("/e/n_0000000000", "/e/n_0000000001")
        );
        let v = s.set("/e", b"x", Some(0)).await.unwrap();
        assert_eq!(v, 1);
        assert_eq!(
            s.set("/e", b"y", Some(0)).await,
            Err(CoordError::BadVersion("/e".into()))
        );
        let failed = s
            .multi(vec![
                Op::Create {
                    path: "/m".into(),
                    data: vec![],
                    kind: NodeKind::Persistent,
                },
                Op::Delete {
                    path: "/missing".into(),
                    version: None,
                },
            ])
            .await;
        assert!(failed.is_err());
        assert_eq!(
            s.get("/m").await.unwrap(),
            None,
            "nothing of a failed batch is applied"
        );
        s.multi(vec![
            Op::Create {
                path: "/m".into(),
                data: vec![],
                kind: NodeKind::Persistent,
            },
            Op::Create {
                path: "/m/x".into(),
                data: vec![1],
                kind: NodeKind::Persistent,
            },
        ])
        .await
        .unwrap();
        assert_eq!(s.children("/m").await.unwrap(), vec!["x".to_string()]);
    }
}
