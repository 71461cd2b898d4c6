//! The ZooKeeper implementation (the `zookeeper-client` crate). The connect string may
//! carry a chroot (`host:2181,host2:2181/cloudtask`); it is created when missing, and
//! every path is then relative to it. Sessions authenticate with the [`Access`]'s digest
//! credential and create every node with the ACL its policy gives the path; hosts named
//! `tcp+tls://` are reached over TLS, verified against the configured CA (and named for
//! the address in the connect string); a session refused for TLS reasons is reported as
//! such (`CoordError::Other`, naming the host and `zookeeper_tls_ca`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zookeeper_client as zk;

use crate::acl::{Access, Grant, Perms};
use crate::{
    CoordError, Coordinator, Node, NodeKind, Op, Result, Session, SessionState, Version, Watch,
    WatchEvent,
};

#[derive(Debug, Clone)]
pub struct ZkCoordinator {
    connect_string: String,
    session_timeout: Duration,
    access: Access,
    /// PEM CA certificates that `tcp+tls://` hosts are verified against.
    tls_ca: Option<String>,
}

impl ZkCoordinator {
    /// Anonymous, on an open tree (see [`Access::open`]); [`ZkCoordinator::with`] names
    /// an identity.
    pub fn new(connect_string: impl Into<String>, session_timeout: Duration) -> Self {
        ZkCoordinator {
            connect_string: connect_string.into(),
            session_timeout,
            access: Access::open(),
            tls_ca: None,
        }
    }

    /// The coordinator `config` describes: its connect string, session timeout and TLS
    /// CA, connecting as the platform's identity (`zookeeper_auth`; anonymous on an open
    /// tree when unset). A worker re-targets it to its own identity after joining.
    pub fn from_config(config: &cloudtask_core::config::Config) -> Result<ZkCoordinator> {
        let access = match &config.zookeeper_auth {
            Some(auth) => Access::owner(crate::Credential::parse(auth)?),
            None => Access::open(),
        };
        let tls_ca = match &config.zookeeper_tls_ca {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                CoordError::Other(format!("zookeeper_tls_ca {}: {e}", path.display()))
            })?),
            None => None,
        };
        Ok(ZkCoordinator::new(
            config.zookeeper.clone(),
            Duration::from_millis(config.zookeeper_session_timeout_ms),
        )
        .with(access)
        .with_tls_ca(tls_ca))
    }

    /// Connects as `access`.
    pub fn with(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Verifies `tcp+tls://` hosts against these PEM CA certificates.
    pub fn with_tls_ca(mut self, pem: Option<String>) -> Self {
        self.tls_ca = pem;
        self
    }
}

pub struct ZkSession {
    /// `None` once closed. Every operation works on a clone; the session ends when the
    /// last clone is dropped.
    client: std::sync::Mutex<Option<zk::Client>>,
    state: watch::Receiver<SessionState>,
    access: Access,
}

fn zk_acl(grants: &[Grant]) -> Vec<zk::Acl> {
    grants
        .iter()
        .map(|g| zk::Acl::new(zk_perms(g.perms), zk::AuthId::new(&g.scheme, &g.id)))
        .collect()
}

/// Each of our permissions and ZooKeeper's.
const PERMISSIONS: [(Perms, zk::Permission); 5] = [
    (Perms::READ, zk::Permission::READ),
    (Perms::WRITE, zk::Permission::WRITE),
    (Perms::CREATE, zk::Permission::CREATE),
    (Perms::DELETE, zk::Permission::DELETE),
    (Perms::ADMIN, zk::Permission::ADMIN),
];

fn zk_perms(perms: Perms) -> zk::Permission {
    PERMISSIONS
        .into_iter()
        .filter(|(ours, _)| perms.contains(*ours))
        .fold(zk::Permission::NONE, |all, (_, theirs)| all | theirs)
}

fn our_perms(perms: zk::Permission) -> Perms {
    PERMISSIONS
        .into_iter()
        .filter(|(_, theirs)| perms.has(*theirs))
        .fold(Perms(0), |all, (ours, _)| all | ours)
}

fn map_state(state: zk::SessionState) -> SessionState {
    match state {
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
            SessionState::Connected
        }
        zk::SessionState::Disconnected => SessionState::Disconnected,
        zk::SessionState::Expired => SessionState::Expired,
        zk::SessionState::Closed | zk::SessionState::AuthFailed => SessionState::Closed,
    }
}

fn map_err(path: &str, e: zk::Error) -> CoordError {
    match e {
        zk::Error::NoNode => CoordError::NoNode(path.into()),
        zk::Error::NodeExists => CoordError::NodeExists(path.into()),
        zk::Error::BadVersion => CoordError::BadVersion(path.into()),
        zk::Error::NotEmpty => CoordError::NotEmpty(path.into()),
        zk::Error::NoAuth => CoordError::NoAuth(path.into()),
        zk::Error::SessionExpired | zk::Error::ClientClosed => CoordError::SessionExpired,
        zk::Error::ConnectionLoss | zk::Error::Timeout | zk::Error::NoHosts => {
            CoordError::ConnectionLoss
        }
        other => CoordError::Other(format!("{path}: {other}")),
    }
}

fn create_mode(kind: NodeKind) -> zk::CreateMode {
    match kind {
        NodeKind::Persistent => zk::CreateMode::Persistent,
        NodeKind::Ephemeral => zk::CreateMode::Ephemeral,
        NodeKind::PersistentSequential => zk::CreateMode::PersistentSequential,
        NodeKind::EphemeralSequential => zk::CreateMode::EphemeralSequential,
    }
}

fn watch_of(watcher: zk::OneshotWatcher) -> Watch {
    Watch::new(async move {
        let event = watcher.changed().await;
        match event.event_type {
            zk::EventType::NodeCreated => WatchEvent::Created,
            zk::EventType::NodeDeleted => WatchEvent::Deleted,
            zk::EventType::NodeDataChanged => WatchEvent::DataChanged,
            zk::EventType::NodeChildrenChanged => WatchEvent::ChildrenChanged,
            zk::EventType::Session => WatchEvent::SessionEnded,
        }
    })
}

#[async_trait::async_trait]
impl Coordinator for ZkCoordinator {
    async fn connect(&self) -> Result<Arc<dyn Session>> {
        Ok(Arc::new(ZkSession::connect(self).await?))
    }

    fn access(&self) -> &Access {
        &self.access
    }

    fn with_access(&self, access: Access) -> Arc<dyn Coordinator> {
        Arc::new(self.clone().with(access))
    }
}

/// Where everything goes when the connect string names no chroot (DESIGN §2).
pub const DEFAULT_ROOT: &str = "/cloudtask";

/// `connect_string` with [`DEFAULT_ROOT`] as its chroot when it names none
/// (`zk1:2181,zk2:2181`); one it names is kept, `/` included (the server's root).
pub fn rooted(connect_string: &str) -> std::borrow::Cow<'_, str> {
    // A chroot is the path after the hosts; `tcp://` and `tcp+tls://` are not one.
    if connect_string.replace("://", "").contains('/') {
        connect_string.into()
    } else {
        format!("{connect_string}{DEFAULT_ROOT}").into()
    }
}

impl ZkSession {
    pub async fn connect(coordinator: &ZkCoordinator) -> Result<ZkSession> {
        let connect_string = &*rooted(&coordinator.connect_string);
        let mut connector =
            zk::Client::connector().with_session_timeout(coordinator.session_timeout);
        if let Some(credential) = coordinator.access.credential() {
            connector = connector.with_auth("digest", credential.auth().as_bytes());
        }
        if let Some(pem) = &coordinator.tls_ca {
            crate::tls::install_crypto_provider();
            let tls = zk::TlsOptions::new()
                .with_pem_ca(pem)
                .map_err(|e| CoordError::Other(format!("the ZooKeeper TLS CA: {e}")))?;
            connector = connector.with_tls(tls);
        } else if connect_string.contains("tcp+tls://") {
            return Err(CoordError::Other(
                "tcp+tls:// ZooKeeper hosts need the CA to verify them (zookeeper_tls_ca)".into(),
            ));
        }
        let client = match connector.connect(connect_string).await {
            Ok(client) => client,
            Err(e) => {
                // The client retried until the session timeout and says only that: when
                // a TLS host refuses its certificate or handshake, say so instead.
                if let Some(pem) = &coordinator.tls_ca {
                    for (host, port) in crate::tls::tls_hosts(connect_string) {
                        if let Some(refusal) = crate::tls::refusal(&host, port, pem).await {
                            return Err(CoordError::Other(refusal));
                        }
                    }
                }
                return Err(map_err(connect_string, e));
            }
        };
        let root = client.path().to_owned();
        if root != "/" {
            // The chroot must exist before anything can be created under it. Only its
            // owner creates it (a worker cannot), with the owner's ACL.
            let unrooted = client.clone().chroot("/").unwrap_or_else(|same| same);
            if unrooted
                .check_stat(&root)
                .await
                .map_err(|e| map_err(&root, e))?
                .is_none()
            {
                let acl = zk_acl(&coordinator.access.acl_for("/"));
                let options = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&acl));
                match unrooted.mkdir(&root, &options).await {
                    Ok(()) | Err(zk::Error::NodeExists) => {}
                    Err(e) => return Err(map_err(&root, e)),
                }
            }
        }
        let (tx, rx) = watch::channel(map_state(client.state()));
        let mut watcher = client.state_watcher();
        tokio::spawn(async move {
            loop {
                let state = map_state(watcher.changed().await);
                if tx.send(state).is_err() || state.is_terminal() {
                    break;
                }
            }
        });
        Ok(ZkSession {
            client: std::sync::Mutex::new(Some(client)),
            state: rx,
            access: coordinator.access.clone(),
        })
    }

    fn client(&self) -> Result<zk::Client> {
        self.client
            .lock()
            .expect("client lock")
            .clone()
            .ok_or(CoordError::SessionExpired)
    }
}

#[async_trait::async_trait]
impl Session for ZkSession {
    async fn create(&self, path: &str, data: &[u8], kind: NodeKind) -> Result<String> {
        let acl = zk_acl(&self.access.acl_for(path));
        let options = create_mode(kind).with_acls(zk::Acls::new(&acl));
        let (_, sequence) = self
            .client()?
            .create(path, data, &options)
            .await
            .map_err(|e| map_err(path, e))?;
        Ok(match kind {
            NodeKind::PersistentSequential | NodeKind::EphemeralSequential => {
                format!("{path}{sequence}")
            }
            _ => path.to_owned(),
        })
    }

    /// Asks first whether the path exists (no right needed): a worker may not create
    /// the folders above its own nodes. Missing ones are created top-down, each with its
    /// own ACL.
    async fn ensure_path(&self, path: &str) -> Result<()> {
        let client = self.client()?;
        if client
            .check_stat(path)
            .await
            .map_err(|e| map_err(path, e))?
            .is_some()
        {
            return Ok(());
        }
        let mut current = String::new();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            current.push('/');
            current.push_str(segment);
            let acl = zk_acl(&self.access.acl_for(&current));
            let options = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&acl));
            match client.create(&current, &[], &options).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(map_err(&current, e)),
            }
        }
        Ok(())
    }

    async fn acl(&self, path: &str) -> Result<Vec<Grant>> {
        let (acl, _) = self
            .client()?
            .get_acl(path)
            .await
            .map_err(|e| map_err(path, e))?;
        Ok(acl
            .iter()
            .map(|a| Grant {
                scheme: a.scheme().to_owned(),
                id: a.id().to_owned(),
                perms: our_perms(a.permission()),
            })
            .collect())
    }

    async fn set_acl(&self, path: &str, acl: &[Grant]) -> Result<()> {
        self.client()?
            .set_acl(path, &zk_acl(acl), None)
            .await
            .map(|_| ())
            .map_err(|e| map_err(path, e))
    }

    async fn get(&self, path: &str) -> Result<Option<Node>> {
        match self.client()?.get_data(path).await {
            Ok((data, stat)) => Ok(Some(Node {
                data,
                version: stat.version,
            })),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(map_err(path, e)),
        }
    }

    async fn get_and_watch(&self, path: &str) -> Result<(Option<Node>, Watch)> {
        match self.client()?.get_and_watch_data(path).await {
            Ok((data, stat, watcher)) => Ok((
                Some(Node {
                    data,
                    version: stat.version,
                }),
                watch_of(watcher),
            )),
            Err(zk::Error::NoNode) => {
                // Absent: watch for its creation instead (and close the race with a
                // creation in between by reading again after the watch is set).
                let (stat, watcher) = self
                    .client()?
                    .check_and_watch_stat(path)
                    .await
                    .map_err(|e| map_err(path, e))?;
                match stat {
                    None => Ok((None, watch_of(watcher))),
                    Some(_) => Ok((
                        self.get(path).await?,
                        Watch::new(async { WatchEvent::Created }),
                    )),
                }
            }
            Err(e) => Err(map_err(path, e)),
        }
    }

    async fn set(&self, path: &str, data: &[u8], version: Option<Version>) -> Result<Version> {
        let stat = self
            .client()?
            .set_data(path, data, version)
            .await
            .map_err(|e| map_err(path, e))?;
        Ok(stat.version)
    }

    async fn delete(&self, path: &str, version: Option<Version>) -> Result<()> {
        self.client()?
            .delete(path, version)
            .await
            .map_err(|e| map_err(path, e))
    }

    async fn children(&self, path: &str) -> Result<Vec<String>> {
        let mut children = self
            .client()?
            .list_children(path)
            .await
            .map_err(|e| map_err(path, e))?;
        children.sort();
        Ok(children)
    }

    async fn children_and_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        let (mut children, watcher) = self
            .client()?
            .list_and_watch_children(path)
            .await
            .map_err(|e| map_err(path, e))?;
        children.sort();
        Ok((children, watch_of(watcher)))
    }

    async fn multi(&self, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        // Each create's ACL, computed first: the writer borrows them until the commit.
        let acls: Vec<Vec<zk::Acl>> = ops
            .iter()
            .map(|op| match op {
                Op::Create { path, .. } => zk_acl(&self.access.acl_for(path)),
                _ => Vec::new(),
            })
            .collect();
        let client = self.client()?;
        let mut writer = client.new_multi_writer();
        for (op, acl) in ops.iter().zip(&acls) {
            let added = match op {
                Op::Create { path, data, kind } => {
                    let options = create_mode(*kind).with_acls(zk::Acls::new(acl));
                    writer.add_create(path, data, &options)
                }
                Op::Set {
                    path,
                    data,
                    version,
                } => writer.add_set_data(path, data, *version),
                Op::Delete { path, version } => writer.add_delete(path, *version),
                Op::Check { path, version } => writer.add_check_version(path, *version),
            };
            added.map_err(|e| map_err("multi", e))?;
        }
        writer.commit().await.map(|_| ()).map_err(|e| match e {
            zk::MultiWriteError::OperationFailed { index, source } => {
                let path = match &ops[index] {
                    Op::Create { path, .. }
                    | Op::Set { path, .. }
                    | Op::Delete { path, .. }
                    | Op::Check { path, .. } => path.clone(),
                };
                map_err(&path, source)
            }
            zk::MultiWriteError::RequestFailed { source } => map_err("multi", source),
        })
    }

    fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    fn granted_timeout(&self) -> Option<Duration> {
        let client = self.client.lock().expect("client lock");
        client.as_ref().map(zk::Client::session_timeout)
    }

    async fn close(&self) {
        self.client.lock().expect("client lock").take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tls_hosts_need_a_ca_and_a_bad_ca_is_reported() {
        let timeout = Duration::from_secs(1);
        let without = ZkCoordinator::new("tcp+tls://127.0.0.1:1/x", timeout);
        match without.connect().await {
            Err(CoordError::Other(message)) => assert!(message.contains("zookeeper_tls_ca")),
            other => panic!("expected a configuration error, got {:?}", other.err()),
        }
        let bad = ZkCoordinator::new("tcp+tls://127.0.0.1:1/x", timeout)
            .with_tls_ca(Some("not a certificate".into()));
        match bad.connect().await {
            Err(CoordError::Other(message)) => assert!(message.contains("TLS CA"), "{message}"),
            other => panic!("expected a CA error, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_connect_string_without_a_chroot_gets_the_default_root() {
        assert_eq!(rooted("zk1:2181,zk2:2181"), "zk1:2181,zk2:2181/cloudtask");
        assert_eq!(rooted("127.0.0.1:2181/tenant-a"), "127.0.0.1:2181/tenant-a");
        assert_eq!(rooted("127.0.0.1:2181/"), "127.0.0.1:2181/");
        assert_eq!(
            rooted("tcp://zk1:2181,tcp+tls://zk2:2281"),
            "tcp://zk1:2181,tcp+tls://zk2:2281/cloudtask"
        );
        assert_eq!(rooted("tcp://zk1:2181/a"), "tcp://zk1:2181/a");
    }
}
