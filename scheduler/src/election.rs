//! Leader election among scheduler replicas: each creates an EPHEMERAL_SEQUENTIAL node;
//! the lowest leads; every other one watches only its predecessor, so a leader's death
//! wakes exactly one standby (no herd).

use cloudtask_coord::layout::{self, ELECTION, ELECTION_PREFIX};
use cloudtask_coord::{CoordError, NodeKind, Result, Session, WatchEvent};

/// Joins the election and returns the path of this replica's node.
pub async fn campaign(session: &dyn Session, identity: &str) -> Result<String> {
    session.ensure_path(ELECTION).await?;
    session
        .create(
            ELECTION_PREFIX,
            identity.as_bytes(),
            NodeKind::EphemeralSequential,
        )
        .await
}

/// Returns once `my_node` is the lowest in the election, or with an error when the
/// session ends (`SessionExpired`) or the node is gone.
pub async fn wait_for_leadership(session: &dyn Session, my_node: &str) -> Result<()> {
    let my_name = my_node.rsplit('/').next().unwrap_or(my_node).to_owned();
    loop {
        let candidates = layout::by_sequence(session.children(ELECTION).await?);
        let Some(position) = candidates.iter().position(|c| *c == my_name) else {
            return Err(CoordError::NoNode(my_node.to_owned()));
        };
        if position == 0 {
            return Ok(());
        }
        let predecessor = layout::join(ELECTION, &candidates[position - 1]);
        let (node, watch) = session.get_and_watch(&predecessor).await?;
        if node.is_none() {
            continue;
        }
        tracing::info!(%predecessor, "standing by");
        if watch.fired().await == WatchEvent::SessionEnded {
            return Err(CoordError::SessionExpired);
        }
    }
}
