//! Names the row-level security migration and the catalogue's scoped handles share.

/// The role a tenant handle's transactions take (no login, no RLS bypass).
pub const TENANT_ROLE: &str = "cloudtask_tenant";
/// The role a cluster handle's transactions take (no login, no RLS bypass).
pub const CLUSTER_ROLE: &str = "cloudtask_cluster";
/// The transaction-local setting holding the tenant handle's tenant id.
pub const TENANT_SETTING: &str = "cloudtask.tenant_id";
/// The transaction-local setting holding the cluster handle's cluster id.
pub const CLUSTER_SETTING: &str = "cloudtask.cluster_id";
