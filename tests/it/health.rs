//! Liveness and readiness over HTTP, and migrations that are a no-op the second time.

use cloudtask_testkit::TestApi;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::support::{ADMIN_EMAIL, PASSWORD};

async fn get(api: &TestApi, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("{}{path}", api.url))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("response body"))
}

#[tokio::test]
async fn healthz_answers_ok() {
    let api = TestApi::start().await;
    let (status, body) = get(&api, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn readyz_answers_200_when_the_database_is_reachable() {
    let api = TestApi::start().await;
    api.catalogue
        .ping()
        .await
        .expect("the database is reachable");
    let (status, body) = get(&api, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.is_empty(), "readyz says something");
}

/// `SELECT COUNT(*)` over `table` in the test's database.
async fn count(api: &TestApi, table: &str) -> i64 {
    api.catalogue
        .connection()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await
        .unwrap_or_else(|e| panic!("counting {table}: {e}"))
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("a count")
}

#[tokio::test]
async fn migrating_twice_is_a_no_op() {
    // TestApi::start has migrated once already.
    let api = TestApi::start().await;
    api.create_user(ADMIN_EMAIL, PASSWORD, true).await;
    let applied = count(&api, "seaql_migrations").await;
    assert!(applied > 0, "the first run recorded its migrations");
    let users = count(&api, "users").await;
    assert_eq!(users, 1);

    api.catalogue
        .migrate()
        .await
        .expect("migrating a second time succeeds");

    assert_eq!(
        count(&api, "seaql_migrations").await,
        applied,
        "no migration applied twice"
    );
    assert_eq!(count(&api, "users").await, users, "data kept as it was");
    // The catalogue still works after the second run.
    let admin = api.login(ADMIN_EMAIL, PASSWORD, None).await;
    assert!(admin.token.is_some());
    let (status, _) = get(&api, "/readyz").await;
    assert_eq!(status, 200);
}
