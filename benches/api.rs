//! API benchmark: `cargo bench --bench api`. Prints a table; every figure comes with a
//! baseline measured in the same run on the same server.
//!
//! - `tasks(first: 50)` at random keyset positions in a tenant of 100,000 tasks, against
//!   the same server answering `{ __typename }` (HTTP + GraphQL overhead alone).
//! - Logins per second, against bare argon2id verifications per second at the same
//!   concurrency (the work a login cannot avoid).

use std::time::{Duration, Instant};

use cloudtask_testkit::TestApi;
use cloudtask_testkit::stats::{ms, percentile};
use serde_json::json;

const TASKS: usize = 100_000;
const SAMPLES: usize = 1_000;
const CONCURRENCY: usize = 4;
const LOGIN_SECONDS: u64 = 5;

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        return;
    }
    let api = TestApi::start_with(|c| {
        c.login_max_attempts = 1_000_000;
        c.rate_anonymous_requests_per_minute = 1_000_000_000;
        c.rate_requests_per_minute = 1_000_000_000;
    })
    .await;
    api.create_user("admin@bench.example", "bench password", true)
        .await;
    let admin = api
        .login("admin@bench.example", "bench password", None)
        .await;
    let tenant = admin
        .run(
            "mutation { createTenant(input: {name: \"bench\", ownerEmail: \"owner@bench.example\", ownerPassword: \"bench password\"}) { id } }",
            json!({}),
        )
        .await;
    let tenant_id = tenant.data()["createTenant"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let owner = api
        .login("owner@bench.example", "bench password", Some(&tenant_id))
        .await;
    let cluster = owner
        .run(
            "mutation { createCluster(name: \"c\") { cluster { id } } }",
            json!({}),
        )
        .await;
    let cluster_id = cluster.data()["createCluster"]["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let seed = Instant::now();
    // Bulk seeding straight in SQL: the benchmark measures reads, not 100k API writes.
    api.seed_tasks(&tenant_id, &cluster_id, TASKS).await;
    let seeded_in = seed.elapsed();

    // Cursors at random positions: every page is a keyset seek deep inside the 100k.
    let ids: Vec<uuid::Uuid> = {
        use sea_orm::{FromQueryResult, Statement};
        #[derive(FromQueryResult)]
        struct Row {
            id: uuid::Uuid,
        }
        let backend = api.catalogue.backend();
        Row::find_by_statement(Statement::from_string(
            backend,
            format!("SELECT id FROM tasks ORDER BY random() LIMIT {SAMPLES}"),
        ))
        .all(api.catalogue.connection())
        .await
        .expect("ids")
        .into_iter()
        .map(|r| r.id)
        .collect()
    };
    let page_query = "query($after: String) { tasks(first: 50, after: $after) {
        edges { cursor node { id name schedule timezone command state version } }
        pageInfo { hasNextPage endCursor } } }";

    let mut baseline = Vec::with_capacity(SAMPLES);
    let mut pages = Vec::with_capacity(SAMPLES);
    for (i, id) in ids.iter().enumerate() {
        let cursor = cloudtask_api::graphql::encode_cursor(*id);
        let start = Instant::now();
        let r = owner.run("{ __typename }", json!({})).await;
        baseline.push(start.elapsed());
        assert!(r.body.get("errors").is_none());
        let start = Instant::now();
        let variables = if i == 0 {
            json!({})
        } else {
            json!({ "after": cursor })
        };
        let r = owner.run(page_query, variables).await;
        pages.push(start.elapsed());
        let edges = r.data()["tasks"]["edges"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        assert!(edges > 0 || r.data()["tasks"]["pageInfo"]["hasNextPage"] == false);
    }
    baseline.sort();
    pages.sort();

    // Logins per second against bare argon2 verifications, same concurrency.
    let hash = cloudtask_api::auth::hash_password("bench password").unwrap();
    let verifies = {
        let deadline = Instant::now() + Duration::from_secs(LOGIN_SECONDS);
        let mut handles = Vec::new();
        for _ in 0..CONCURRENCY {
            let hash = hash.clone();
            handles.push(tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    assert!(cloudtask_api::auth::verify_password(
                        "bench password",
                        &hash
                    ));
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        total as f64 / LOGIN_SECONDS as f64
    };
    let logins = {
        let deadline = Instant::now() + Duration::from_secs(LOGIN_SECONDS);
        let mut handles = Vec::new();
        for _ in 0..CONCURRENCY {
            let client = api.client();
            let tenant_id = tenant_id.clone();
            handles.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let r = client
                        .run(
                            "mutation($t: ID) { login(email: \"owner@bench.example\", password: \"bench password\", tenantId: $t) { accessToken } }",
                            json!({ "t": tenant_id }),
                        )
                        .await;
                    assert!(r.data()["login"]["accessToken"].is_string());
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        total as f64 / LOGIN_SECONDS as f64
    };

    println!();
    println!(
        "seeded {TASKS} tasks in {:.1} s; {SAMPLES} samples each",
        seeded_in.as_secs_f64()
    );
    println!("| measurement | p50 ms | p99 ms | baseline p50 ms | baseline p99 ms | p99 ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| tasks(first: 50), 100k tasks vs {{ __typename }} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        ms(percentile(&pages, 0.5)),
        ms(percentile(&pages, 0.99)),
        ms(percentile(&baseline, 0.5)),
        ms(percentile(&baseline, 0.99)),
        ms(percentile(&pages, 0.99)) / ms(percentile(&baseline, 0.99)),
    );
    println!();
    println!(
        "| measurement ({CONCURRENCY} concurrent) | per second | baseline per second | ratio |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| logins vs bare argon2id verifications | {logins:.1} | {verifies:.1} | {:.2} |",
        logins / verifies
    );
}
