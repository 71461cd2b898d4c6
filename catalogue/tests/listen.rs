//! The catalogue's LISTEN connections (events for subscribers, changes for the
//! scheduler) outlive a lost connection: when Postgres drops one, its consumer is told to
//! resync (notifications may have been missed meanwhile), and what is notified once it is
//! back is heard again. Real Postgres; the connection is dropped by the server
//! (`pg_terminate_backend`), as a restart or a failover would.

use std::time::Duration;

use cloudtask_catalogue::Catalogue;
use cloudtask_catalogue::live_events::{Event, Events};
use cloudtask_catalogue::mirror_changes::Changes;
use cloudtask_core::ids::{ClusterId, RunId};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

/// Longest wait for anything the listener should hear.
const PATIENCE: Duration = Duration::from_secs(15);

async fn catalogue() -> Catalogue {
    let url = cloudtask_testkit::fresh_database().await;
    let catalogue = Catalogue::connect(&url).await.unwrap();
    catalogue.migrate().await.unwrap();
    catalogue
}

/// Terminates this database's connection that listens on `channel`; fails the test if
/// there is none.
async fn drop_listener(catalogue: &Catalogue, channel: &str) {
    let db = catalogue.connection();
    let dropped = db
        .query_all_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT pg_terminate_backend(pid) AS dropped FROM pg_stat_activity \
             WHERE datname = current_database() AND query = 'LISTEN \"' || $1 || '\"'",
            [channel.into()],
        ))
        .await
        .unwrap();
    assert_eq!(dropped.len(), 1, "one connection listens on {channel}");
}

async fn heard(events: &mut Events) -> Event {
    tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event in time")
        .expect("the catalogue is there")
}

async fn batch(changes: &mut Changes) -> Vec<ClusterId> {
    tokio::time::timeout(PATIENCE, changes.next_batch())
        .await
        .expect("a change in time")
        .expect("the listener is there")
}

#[tokio::test]
async fn an_event_subscriber_is_told_to_resync_and_hears_events_again() {
    let catalogue = catalogue().await;
    let mut events = catalogue.events().await.unwrap();
    let run = RunId::from(uuid::Uuid::now_v7());
    catalogue.announce(Event::Logs { run, next: 1 });
    assert_eq!(heard(&mut events).await, Event::Logs { run, next: 1 });

    drop_listener(&catalogue, cloudtask_catalogue::live_events::CHANNEL).await;
    assert_eq!(heard(&mut events).await, Event::Resync);

    // Heard again once the listener is back (what is announced before it has listened
    // again is what the resync covers).
    let again = tokio::time::Instant::now() + PATIENCE;
    for next in 2.. {
        assert!(
            tokio::time::Instant::now() < again,
            "no event heard after the reconnection"
        );
        catalogue.announce(Event::Logs { run, next });
        let event = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        match event {
            Ok(Some(Event::Logs { run: r, .. })) if r == run => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => continue,
        }
    }
}

#[tokio::test]
async fn the_change_listener_asks_for_a_resync_and_hears_changes_again() {
    let catalogue = catalogue().await;
    let mut changes = catalogue.listen_changes().await.unwrap();
    let notify = |cluster: ClusterId| {
        let db = catalogue.connection().clone();
        async move {
            db.execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [
                    cloudtask_catalogue::mirror_changes::CHANNEL.into(),
                    cluster.to_string().into(),
                ],
            ))
            .await
            .unwrap();
        }
    };

    let cluster = ClusterId::from(uuid::Uuid::now_v7());
    notify(cluster).await;
    assert_eq!(batch(&mut changes).await, vec![cluster]);

    drop_listener(&catalogue, cloudtask_catalogue::mirror_changes::CHANNEL).await;
    // A resync is an empty batch: every cluster is reconciled.
    assert_eq!(batch(&mut changes).await, Vec::<ClusterId>::new());

    let again = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            tokio::time::Instant::now() < again,
            "no change heard after the reconnection"
        );
        notify(cluster).await;
        match tokio::time::timeout(Duration::from_millis(200), changes.next_batch()).await {
            Ok(Some(clusters)) if clusters == vec![cluster] => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => continue,
        }
    }
}
