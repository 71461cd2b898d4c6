//! The coordination contract: what lives in ZooKeeper, under which paths, encoded how
//! (`layout`), and one [`Coordinator`] abstraction with two implementations: ZooKeeper
//! (`zk`) for real deployments and the integration suite, and an in-memory one (`memory`)
//! with the same semantics for unit tests and the standalone mode.

pub mod acl;
pub mod layout;
pub mod memory;
mod tls;
pub mod zk;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

pub use acl::{Access, Credential, Grant, Perms};

/// A znode's data version, as ZooKeeper counts it.
pub type Version = i32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Persistent,
    /// Removed when the creating session ends.
    Ephemeral,
    /// A persistent node whose name gets a 10-digit increasing suffix.
    PersistentSequential,
    EphemeralSequential,
}

/// What a session has to say about itself. `Expired` and `Closed` are final: the
/// session's ephemeral nodes are gone and a new session is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Connected,
    /// Connection lost; the session may still be alive and resume.
    Disconnected,
    Expired,
    Closed,
}

impl SessionState {
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Expired | SessionState::Closed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    #[error("no node {0}")]
    NoNode(String),
    #[error("node {0} exists")]
    NodeExists(String),
    #[error("version mismatch at {0}")]
    BadVersion(String),
    #[error("node {0} has children")]
    NotEmpty(String),
    /// The session's identity lacks the right (its ACL, or its parent's for create and
    /// delete).
    #[error("not allowed at {0}")]
    NoAuth(String),
    #[error("connection lost")]
    ConnectionLoss,
    #[error("session expired")]
    SessionExpired,
    #[error("coordination error: {0}")]
    Other(String),
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// A node's data and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub data: Vec<u8>,
    pub version: Version,
}

/// What fired a one-shot watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    Created,
    Deleted,
    DataChanged,
    ChildrenChanged,
    /// The session ended before anything changed: re-read everything on a new session.
    SessionEnded,
}

/// A one-shot watch: resolves once, on the first change after it was set.
pub struct Watch(BoxFuture<'static, WatchEvent>);

impl Watch {
    pub fn new(future: impl std::future::Future<Output = WatchEvent> + Send + 'static) -> Self {
        Watch(Box::pin(future))
    }

    pub async fn fired(self) -> WatchEvent {
        self.0.await
    }
}

/// One write of an atomic batch.
#[derive(Debug, Clone)]
pub enum Op {
    Create {
        path: String,
        data: Vec<u8>,
        kind: NodeKind,
    },
    Set {
        path: String,
        data: Vec<u8>,
        version: Option<Version>,
    },
    Delete {
        path: String,
        version: Option<Version>,
    },
    Check {
        path: String,
        version: Version,
    },
}

/// A live session with the coordination service. Paths are absolute inside the
/// configured root (the connect string's chroot for ZooKeeper).
#[async_trait::async_trait]
pub trait Session: Send + Sync {
    /// Creates a node; returns its path (with the sequence suffix for sequential kinds).
    async fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<String>;
    /// Creates the path and its missing parents as empty persistent nodes.
    async fn ensure_path(&self, path: &str) -> Result<()>;
    async fn get(&self, path: &str) -> Result<Option<Node>>;
    /// Reads the node and watches it for change, deletion or (if absent) creation.
    async fn get_and_watch(&self, path: &str) -> Result<(Option<Node>, Watch)>;
    async fn set(&self, path: &str, data: &[u8], version: Option<Version>) -> Result<Version>;
    async fn delete(&self, path: &str, version: Option<Version>) -> Result<()>;
    /// Child names, sorted.
    async fn children(&self, path: &str) -> Result<Vec<String>>;
    /// Child names, sorted, and a watch on the set of children (or on the node's deletion).
    async fn children_and_watch(&self, path: &str) -> Result<(Vec<String>, Watch)>;
    /// The node's ACL (needs no right).
    async fn acl(&self, path: &str) -> Result<Vec<Grant>>;
    /// Replaces the node's ACL (needs ADMIN on it).
    async fn set_acl(&self, path: &str, acl: &[Grant]) -> Result<()>;
    /// Applies every op or none.
    async fn multi(&self, ops: Vec<Op>) -> Result<()>;
    /// The session's state; it changes as the connection comes and goes.
    fn state(&self) -> watch::Receiver<SessionState>;
    /// The session timeout the server granted (it may differ from the one asked for),
    /// when there is a server.
    fn granted_timeout(&self) -> Option<std::time::Duration> {
        None
    }
    /// Ends the session at once: its ephemeral nodes vanish now, not after the timeout.
    async fn close(&self);
}

/// Opens sessions. A holder of a session whose state turned terminal asks for a new one.
#[async_trait::async_trait]
pub trait Coordinator: Send + Sync {
    async fn connect(&self) -> Result<Arc<dyn Session>>;
    /// Who sessions connect as, and the ACLs their creates set.
    fn access(&self) -> &Access;
    /// The same service, reached as another identity (a worker's, once it joined).
    fn with_access(&self, access: Access) -> Arc<dyn Coordinator>;
}

/// Deletes a node and everything under it (children first). Missing nodes are fine.
pub async fn delete_recursive(session: &dyn Session, path: &str) -> Result<()> {
    for node in subtree_children_first(session, path).await? {
        match session.delete(&node, None).await {
            Ok(()) | Err(CoordError::NoNode(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `path` and every node under it, children before their parent, listed without
/// recursion. Nodes gone meanwhile are left out below them; a node whose children cannot
/// be listed (no READ right) is reported and listed alone.
pub async fn subtree_children_first(session: &dyn Session, path: &str) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut stack = vec![(path.to_owned(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            order.push(node);
            continue;
        }
        stack.push((node.clone(), true));
        match session.children(&node).await {
            Ok(children) => stack.extend(
                children
                    .into_iter()
                    .map(|child| (layout::join(&node, &child), false)),
            ),
            Err(CoordError::NoNode(_)) => {}
            Err(CoordError::NoAuth(_)) => {
                tracing::warn!(%node, "cannot list this node's children (no READ right)")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(order)
}

/// A session opened on first use and opened again after it ends: for readers (the API's
/// cluster view) that hold nothing ephemeral and only need *a* live session.
pub struct SharedSession {
    coordinator: Arc<dyn Coordinator>,
    current: tokio::sync::Mutex<Option<Arc<dyn Session>>>,
}

impl SharedSession {
    pub fn new(coordinator: Arc<dyn Coordinator>) -> Self {
        SharedSession {
            coordinator,
            current: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Result<Arc<dyn Session>> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref()
            && !session.state().borrow().is_terminal()
        {
            return Ok(session.clone());
        }
        let session = self.coordinator.connect().await?;
        *current = Some(session.clone());
        Ok(session)
    }

    /// Drops the current session (it answers nothing): the next `get` connects anew.
    /// A no-op while someone else holds it (connecting already).
    pub fn forget(&self) {
        if let Ok(mut current) = self.current.try_lock() {
            current.take();
        }
    }
}
