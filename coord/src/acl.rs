//! Who may touch which znode (DESIGN §2). Workers run on tenants' hosts, so the tree is
//! not one trust domain:
//!
//! - the platform's identity (the scheduler's and the API's, `zookeeper_auth`) owns every
//!   node, with every right;
//! - each cluster's workers share a digest identity of their own, issued by the API at
//!   join ([`Access::worker_access`]); it reaches its own cluster's nodes only, and only
//!   as the worker protocol needs ([`cluster_rights`]): read the cluster's tasks,
//!   assignments and commands, create and delete worker nodes, consume (delete) its
//!   commands, write departure markers;
//! - anyone else: nothing.
//!
//! ACLs in ZooKeeper are per node, not inherited: every create sets the ACL this policy
//! gives the path ([`Access::acl_for`]), whoever creates it, and [`enforce`] repairs
//! older trees. An [`Access::open`] coordinator (no `zookeeper_auth`: development only)
//! creates everything world-writable, as before.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use cloudtask_core::ids::ClusterId;
use hmac::{Hmac, Mac};
use sha1::Digest;

use crate::{CoordError, Result, Session, layout};

/// Rights on one node, numbered as ZooKeeper numbers them. CREATE and DELETE are rights
/// on a node's *children*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Perms(pub u8);

impl Perms {
    pub const READ: Perms = Perms(1);
    pub const WRITE: Perms = Perms(2);
    pub const CREATE: Perms = Perms(4);
    pub const DELETE: Perms = Perms(8);
    pub const ADMIN: Perms = Perms(16);
    pub const ALL: Perms = Perms(31);

    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

/// One entry of a node's ACL: a principal (`scheme`, `id`) and its rights.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    pub scheme: String,
    pub id: String,
    pub perms: Perms,
}

impl Grant {
    pub fn anyone_all() -> Grant {
        Grant {
            scheme: "world".into(),
            id: "anyone".into(),
            perms: Perms::ALL,
        }
    }

    pub fn digest(id: &str, perms: Perms) -> Grant {
        Grant {
            scheme: "digest".into(),
            id: id.into(),
            perms,
        }
    }

    /// Whether this grant gives `perm` to a session authenticated as `digests`.
    pub fn allows(&self, digests: &[String], perm: Perms) -> bool {
        self.perms.contains(perm)
            && match self.scheme.as_str() {
                "world" => self.id == "anyone",
                "digest" => digests.contains(&self.id),
                _ => false,
            }
    }
}

/// A ZooKeeper digest credential (`user:password`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    user: String,
    password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credential {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Result<Credential> {
        let (user, password) = (user.into(), password.into());
        if user.is_empty() || user.contains(':') || password.is_empty() {
            return Err(CoordError::Other(
                "a ZooKeeper credential is `user:password`, with a user without ':' and a \
                 password that is not empty"
                    .into(),
            ));
        }
        Ok(Credential { user, password })
    }

    /// `user:password`, as configured (`zookeeper_auth`).
    pub fn parse(text: &str) -> Result<Credential> {
        let (user, password) = text.split_once(':').unwrap_or((text, ""));
        Credential::new(user, password)
    }

    /// A fresh credential with a random 256-bit password (tests, standalone).
    pub fn generate(user: &str) -> Credential {
        let bytes: [u8; 32] = rand::random();
        Credential {
            user: user.into(),
            password: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// What the client sends to authenticate (scheme `digest`).
    pub fn auth(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    /// The id ACLs name this credential by: `user:base64(sha1(user:password))`, as
    /// ZooKeeper's DigestAuthenticationProvider computes it.
    pub fn digest_id(&self) -> String {
        let hash = sha1::Sha1::digest(self.auth().as_bytes());
        format!("{}:{}", self.user, STANDARD.encode(hash))
    }

    /// The identity of one cluster's workers while its join token is the one rotated at
    /// `token_rotated_at`: derived from the owner's password (HMAC-SHA256), so that the
    /// API and the scheduler agree on it without storing it, and a token rotation
    /// replaces it.
    pub fn for_cluster(
        owner: &Credential,
        cluster: ClusterId,
        token_rotated_at: DateTime<Utc>,
    ) -> Credential {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(owner.password.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(
            format!(
                "cloudtask cluster worker\n{cluster}\n{}",
                token_rotated_at.timestamp_micros()
            )
            .as_bytes(),
        );
        Credential {
            user: format!("cluster-{cluster}"),
            password: URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
        }
    }
}

/// The rights a cluster's workers hold on a path of their own cluster (`None`: no
/// rights, the path is not theirs or the protocol does not need them to touch it).
pub fn cluster_rights(path: &str) -> Option<(ClusterId, Perms)> {
    let rest = path.strip_prefix(layout::CLUSTERS)?.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (cluster, below) = segments.split_first()?;
    let cluster: ClusterId = cluster.parse().ok()?;
    let read = Perms::READ;
    let perms = match below {
        [] => read,
        // Register (create our ephemeral node) and leave (delete it).
        ["workers"] => read | Perms::CREATE | Perms::DELETE,
        ["workers", _] => read,
        ["tasks"] | ["tasks", _] => read,
        // A worker lists its assignment folder and never reads an assignment (an empty
        // node: its name is all), so an assignment names the owner alone. A create
        // carries its ACL, into ZooKeeper's log too, and ZooKeeper's cost follows the
        // bytes: the workers' grant (~90 bytes on a ~200-byte create) made each empty
        // create ~12% slower (scheduler/benches/allocation.rs), and allocation writes one
        // per task.
        ["assignments"] | ["assignments", _] => read,
        ["commands"] => read,
        // Consume (delete) the commands handed to us; never write one.
        ["commands", _] => read | Perms::DELETE,
        ["commands", _, _] => read,
        // A clean leave writes a marker (created, or rewritten when one is left over).
        ["departures"] => read | Perms::CREATE,
        ["departures", _] => read | Perms::WRITE,
        _ => return None,
    };
    Some((cluster, perms))
}

/// Which identities the ACLs of a tree name: the owner's, and each cluster's workers'.
#[derive(Default)]
struct Policy {
    /// `None`: an open tree (every node world-writable).
    owner: Option<String>,
    clusters: RwLock<HashMap<ClusterId, String>>,
}

/// Who a coordinator connects as, and the ACLs its creates set.
#[derive(Clone, Default)]
pub struct Access {
    credential: Option<Credential>,
    /// The owner's credential, on the owner's side only: cluster identities derive from it.
    owner: Option<Credential>,
    policy: Arc<Policy>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("user", &self.credential.as_ref().map(Credential::user))
            .field("open", &self.is_open())
            .finish()
    }
}

impl Access {
    /// Anonymous, on an open tree: every node created world-writable (development).
    pub fn open() -> Access {
        Access::default()
    }

    /// The platform's identity: owns every node it creates.
    pub fn owner(credential: Credential) -> Access {
        Access {
            policy: Arc::new(Policy {
                owner: Some(credential.digest_id()),
                clusters: RwLock::default(),
            }),
            owner: Some(credential.clone()),
            credential: Some(credential),
        }
    }

    /// A worker of `cluster`, with the identity it was issued at join; `owner_id` is the
    /// owner's digest id, which the nodes the worker creates name as their owner.
    pub fn cluster_worker(credential: Credential, cluster: ClusterId, owner_id: &str) -> Access {
        let policy = Policy {
            owner: Some(owner_id.to_owned()),
            clusters: RwLock::new(HashMap::from([(cluster, credential.digest_id())])),
        };
        Access {
            credential: Some(credential),
            owner: None,
            policy: Arc::new(policy),
        }
    }

    /// Anonymous on a tree that is not open (tests: what a stranger sees).
    pub fn anonymous_on(owned: &Access) -> Access {
        Access {
            credential: None,
            owner: None,
            policy: owned.policy.clone(),
        }
    }

    pub fn credential(&self) -> Option<&Credential> {
        self.credential.as_ref()
    }

    /// No owner: nodes are created world-writable.
    pub fn is_open(&self) -> bool {
        self.policy.owner.is_none()
    }

    /// The owner's digest id (what a worker is told at join).
    pub fn owner_id(&self) -> Option<&str> {
        self.policy.owner.as_deref()
    }

    /// The digest ids this access authenticates as.
    pub fn digests(&self) -> Vec<String> {
        self.credential.iter().map(Credential::digest_id).collect()
    }

    /// The identity the workers of `cluster` get at join (owner only; `None` on an open
    /// tree, where workers connect anonymously).
    pub fn worker_credential(
        &self,
        cluster: ClusterId,
        token_rotated_at: DateTime<Utc>,
    ) -> Option<Credential> {
        let owner = self.owner.as_ref()?;
        Some(Credential::for_cluster(owner, cluster, token_rotated_at))
    }

    /// Names `cluster`'s current worker identity in the ACLs written from now on (owner
    /// only). True when it changed: a new cluster, or its join token was rotated; the
    /// caller then [`enforce`]s the cluster's subtree.
    pub fn admit_cluster(&self, cluster: ClusterId, token_rotated_at: DateTime<Utc>) -> bool {
        let Some(credential) = self.worker_credential(cluster, token_rotated_at) else {
            return false;
        };
        let id = credential.digest_id();
        let mut clusters = self.policy.clusters.write().expect("policy lock");
        clusters.insert(cluster, id.clone()).as_ref() != Some(&id)
    }

    pub fn forget_cluster(&self, cluster: ClusterId) {
        self.policy
            .clusters
            .write()
            .expect("policy lock")
            .remove(&cluster);
    }

    /// The ACL of a node at `path` (inside the root): the owner with every right, and the
    /// path's cluster with what [`cluster_rights`] gives it.
    pub fn acl_for(&self, path: &str) -> Vec<Grant> {
        let Some(owner) = &self.policy.owner else {
            return vec![Grant::anyone_all()];
        };
        let mut acl = vec![Grant::digest(owner, Perms::ALL)];
        if let Some((cluster, perms)) = cluster_rights(path)
            && let Some(id) = self
                .policy
                .clusters
                .read()
                .expect("policy lock")
                .get(&cluster)
        {
            acl.push(Grant::digest(id, perms));
        }
        acl
    }
}

fn same_acl(a: &[Grant], b: &[Grant]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// Sets the policy's ACL on `path` and everything under it where it differs (children
/// before their parent, so a walk cut short is finished by the next one). Nodes the owner
/// cannot reach (created by a worker with an ACL of its own) are reported and skipped.
/// Returns how many nodes were changed.
pub async fn enforce(session: &dyn Session, access: &Access, path: &str) -> Result<usize> {
    let mut changed = 0;
    for node in crate::subtree_children_first(session, path).await? {
        let wanted = access.acl_for(&node);
        match session.acl(&node).await {
            Ok(current) if same_acl(&current, &wanted) => {}
            Ok(_) => match session.set_acl(&node, &wanted).await {
                Ok(()) => changed += 1,
                Err(CoordError::NoNode(_)) => {}
                Err(CoordError::NoAuth(_)) => {
                    tracing::warn!(%node, "cannot set this node's ACL (no ADMIN right)")
                }
                Err(e) => return Err(e),
            },
            Err(CoordError::NoNode(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

/// Sets the policy's ACL on the one node at `path` where it differs (1 when it did).
pub async fn enforce_node(session: &dyn Session, access: &Access, path: &str) -> Result<usize> {
    let wanted = access.acl_for(path);
    match session.acl(path).await {
        Ok(current) if same_acl(&current, &wanted) => Ok(0),
        Ok(_) => session.set_acl(path, &wanted).await.map(|()| 1),
        Err(CoordError::NoNode(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// [`enforce`] on one cluster's subtree, skipped when its top node is right already
/// (the walk sets the top last): a start-up check that costs one read per cluster.
pub async fn enforce_cluster(
    session: &dyn Session,
    access: &Access,
    cluster: ClusterId,
) -> Result<usize> {
    let top = layout::cluster(cluster);
    match session.acl(&top).await {
        Ok(current) if same_acl(&current, &access.acl_for(&top)) => Ok(0),
        Ok(_) => enforce(session, access, &top).await,
        Err(CoordError::NoNode(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ids_are_zookeepers() {
        // base64(sha1("super:secret")), as DigestAuthenticationProvider.generateDigest gives
        let credential = Credential::parse("super:secret").unwrap();
        assert_eq!(credential.digest_id(), "super:lK75jTNcA+U9vtVEw5vB51mj/w4=");
        assert!(Credential::parse("nopassword").is_err());
        assert!(Credential::parse(":x").is_err());
        assert!(!format!("{credential:?}").contains("secret"));
    }

    #[test]
    fn a_cluster_identity_is_stable_until_its_token_rotates() {
        let owner = Credential::parse("platform:p").unwrap();
        let cluster = ClusterId::new();
        let at: DateTime<Utc> = "2030-01-01T00:00:00.123456Z".parse().unwrap();
        let later = at + chrono::Duration::microseconds(1);
        let one = Credential::for_cluster(&owner, cluster, at);
        assert_eq!(one, Credential::for_cluster(&owner, cluster, at));
        assert_ne!(one, Credential::for_cluster(&owner, cluster, later));
        assert_ne!(one, Credential::for_cluster(&owner, ClusterId::new(), at));
        let other_owner = Credential::parse("platform:q").unwrap();
        assert_ne!(one, Credential::for_cluster(&other_owner, cluster, at));
    }

    #[test]
    fn workers_reach_only_their_own_cluster_and_only_what_the_protocol_needs() {
        let c = ClusterId::new();
        let rights = |p: &str| cluster_rights(&p.replace("{c}", &c.to_string()));
        assert_eq!(rights("/clusters/{c}/tasks/t"), Some((c, Perms::READ)));
        assert_eq!(
            rights("/clusters/{c}/assignments/w"),
            Some((c, Perms::READ))
        );
        assert_eq!(rights("/clusters/{c}/assignments/w/t"), None);
        assert_eq!(
            rights("/clusters/{c}/workers"),
            Some((c, Perms::READ | Perms::CREATE | Perms::DELETE))
        );
        assert_eq!(
            rights("/clusters/{c}/commands/w"),
            Some((c, Perms::READ | Perms::DELETE))
        );
        assert_eq!(
            rights("/clusters/{c}/commands/w/c_1"),
            Some((c, Perms::READ))
        );
        assert_eq!(rights("/clusters/{c}/elsewhere"), None);
        assert_eq!(rights("/clusters"), None);
        assert_eq!(rights("/scheduler/election/n_1"), None);
        assert_eq!(rights("/clusters/not-an-id/tasks"), None);

        let owner = Access::owner(Credential::parse("platform:p").unwrap());
        assert_eq!(
            owner.acl_for("/clusters/x"),
            vec![Grant::digest(owner.owner_id().unwrap(), Perms::ALL)]
        );
        let at = Utc::now();
        assert!(owner.admit_cluster(c, at));
        assert!(!owner.admit_cluster(c, at), "unchanged");
        let worker = owner.worker_credential(c, at).unwrap();
        let acl = owner.acl_for(&format!("/clusters/{c}/tasks"));
        assert!(acl.contains(&Grant::digest(&worker.digest_id(), Perms::READ)));
        assert!(owner.admit_cluster(c, at + chrono::Duration::seconds(1)));
        assert!(Access::open().acl_for("/x") == vec![Grant::anyone_all()]);
    }
}
