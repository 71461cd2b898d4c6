//! Test-only helpers: a fresh Postgres database per test, the real API on port 0, and a
//! small GraphQL client (JSON and multipart uploads).

mod proxy;
mod smtp;
mod socket;
mod stand_in;
pub mod stats;
mod zookeeper;

use std::sync::Arc;

use cloudtask_api::AppState;
use cloudtask_catalogue::{Catalogue, NewUser, Scope, Tenant, TenantHandle};
use cloudtask_core::config::Config;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use proxy::Proxy;
pub use smtp::{Mail, SmtpSink};
pub use socket::{Closed, GqlSocket, Reply};
pub use stand_in::stand_in_api;
pub use zookeeper::{PrivateZooKeeper, TestCa, fresh_zookeeper};

/// Where tests create their databases: `CLOUDTASK_TEST_DATABASE_URL`, else the local
/// server's maintenance database.
pub fn admin_database_url() -> String {
    std::env::var("CLOUDTASK_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Every test database starts with this prefix; `scripts/test.sh` drops leftovers.
pub const TEST_DATABASE_PREFIX: &str = "cloudtask_test_";

/// Creates an empty database with a unique name and returns its URL.
pub async fn fresh_database() -> String {
    let admin_url = admin_database_url();
    let admin = Database::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("Postgres at {admin_url} is not reachable: {e}"));
    let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("creating a test database");
    admin.close().await.ok();
    let (base, _) = admin_url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// The real API, serving on 127.0.0.1:0 over a fresh, migrated database.
pub struct TestApi {
    pub url: String,
    pub catalogue: Catalogue,
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A tenant named `name` made by a platform admin on a migrated `catalogue`, with its
/// owner (`owner@<name>.example`), and the owner's handle on it.
pub async fn owned_tenant(catalogue: &Catalogue, name: &str) -> (Tenant, TenantHandle) {
    let admin = catalogue
        .create_user(NewUser {
            email: format!("admin@{name}.example"),
            password_hash: "x".into(),
            platform_admin: true,
        })
        .await
        .expect("the platform admin");
    let actor = admin.id.to_string();
    let owner_email = format!("owner@{name}.example");
    let tenant = catalogue
        .create_tenant((admin.id, &actor), name, &owner_email, Some("x".into()))
        .await
        .expect("the tenant");
    let owner = catalogue
        .user_credentials(&owner_email)
        .await
        .expect("the owner's account")
        .expect("an owner")
        .user;
    let handle = catalogue
        .tenant(Scope {
            tenant_id: tenant.id,
            user_id: owner.id,
            actor: "owner".into(),
        })
        .await
        .expect("the owner's handle");
    (tenant, handle)
}

/// The platform's ZooKeeper credential in tests (`zookeeper_auth`): generated once per
/// test process, so the coordination tree has ACLs in every test that uses it.
pub fn test_zookeeper_auth() -> &'static str {
    static AUTH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| format!("cloudtask:{}", uuid::Uuid::new_v4().simple()))
}

/// A configuration for tests: a fresh database URL, a known JWT secret, and the test
/// process's ZooKeeper credential.
pub fn test_config(database_url: String) -> Config {
    Config {
        database_url,
        jwt_secret: Some(TEST_JWT_SECRET.into()),
        zookeeper_auth: Some(test_zookeeper_auth().into()),
        listen: "127.0.0.1:0".parse().expect("address"),
        // Tests poll the API in tight loops; the budgets have tests of their own.
        rate_requests_per_minute: 600_000,
        rate_cost_per_minute: 1 << 40,
        ..Config::default()
    }
}

impl TestApi {
    pub async fn start() -> TestApi {
        Self::start_with(|_| {}).await
    }

    /// Starts the API with a configuration adjusted by `adjust` (limits, TTLs).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestApi {
        let mut config = test_config(fresh_database().await);
        adjust(&mut config);
        config.validate().expect("test configuration is valid");
        let catalogue = Catalogue::connect(&config.database_url)
            .await
            .expect("connect")
            .with_queue_expiry(std::time::Duration::from_secs(config.queue_expiry_secs));
        catalogue.migrate().await.expect("migrate");
        Self::serve(catalogue, config).await
    }

    /// Another API replica over the same database and configuration, with connections
    /// (and change listeners) of its own, as a second `cloudtask api` process would have.
    pub async fn replica(&self) -> TestApi {
        let config = (*self.state.config).clone();
        let catalogue = Catalogue::connect(&config.database_url)
            .await
            .expect("connect")
            .with_queue_expiry(std::time::Duration::from_secs(config.queue_expiry_secs));
        Self::serve(catalogue, config).await
    }

    async fn serve(catalogue: Catalogue, config: Config) -> TestApi {
        let state = AppState::new(catalogue.clone(), config).expect("api state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let shutdown = CancellationToken::new();
        tokio::spawn(cloudtask_api::run(
            state.clone(),
            listener,
            shutdown.clone(),
        ));
        TestApi {
            url,
            catalogue,
            state,
            shutdown,
        }
    }

    /// `count` active tasks (`task-1`…) in a cluster, straight in SQL: for benchmarks and
    /// tests that read many tasks, not write them.
    pub async fn seed_tasks(&self, tenant_id: &str, cluster_id: &str, count: usize) {
        let tenant = tenant_id.trim_start_matches("tnt_");
        let cluster = cluster_id.trim_start_matches("cls_");
        self.catalogue
            .connection()
            .execute_unprepared(&format!(
                "INSERT INTO tasks (id, tenant_id, cluster_id, name, description, state, version, spec, created_at, updated_at)
                 SELECT gen_random_uuid(), '{tenant}', '{cluster}', 'task-' || i, '', 'ACTIVE', 1,
                        '{{\"schedule\":\"*/5 * * * *\",\"timezone\":\"UTC\",\"command\":\"echo hi\",\"timeoutSeconds\":null,\"packageSha256\":null,\"activeFrom\":null,\"activeUntil\":null}}'::json,
                        now(), now()
                 FROM generate_series(1, {count}) AS i;
                 ANALYZE tasks;"
            ))
            .await
            .expect("seeding tasks");
    }

    /// A run of `task_id` with `lines` stdout lines of `width` characters each, recorded as
    /// its worker would; the run's id.
    pub async fn run_with_lines(
        &self,
        cluster_id: &str,
        task_id: &str,
        lines: u64,
        width: usize,
    ) -> String {
        use cloudtask_core::protocol::{Claim, Report};
        use cloudtask_core::run::{LogLine, LogStream, RunStatus, RunTrigger};
        let cluster = self
            .catalogue
            .cluster(cluster_id.parse().expect("a cluster id"));
        let run = cluster
            .claim_run(&Claim {
                task_id: task_id.parse().expect("a task id"),
                scheduled_at: chrono::Utc::now(),
                attempt: 0,
                task_version: 1,
                worker: "w1".parse().expect("a worker name"),
                trigger: RunTrigger::Schedule,
                status: RunStatus::Running,
                reason: None,
            })
            .await
            .expect("a run claimed");
        let text = "x".repeat(width);
        let lines = (0..lines)
            .map(|offset| LogLine {
                offset,
                stream: LogStream::Stdout,
                at: chrono::Utc::now(),
                text: text.clone(),
            })
            .collect();
        cluster
            .ingest_reports(&[Report::Logs { run: run.id, lines }])
            .await
            .expect("lines recorded");
        run.id.to_string()
    }

    /// A user created the way `cloudtask admin create-user` does.
    pub async fn create_user(&self, email: &str, password: &str, platform_admin: bool) {
        let password_hash = cloudtask_api::auth::hash_password(password).expect("hash");
        self.catalogue
            .create_user(NewUser {
                email: email.into(),
                password_hash,
                platform_admin,
            })
            .await
            .expect("create user");
    }

    /// A platform admin, a tenant `name` with its owner `owner@<name>.example`, and one
    /// cluster, all made through the API as a user would; `password` for both users.
    pub async fn tenant_with_cluster(&self, name: &str, password: &str) -> TenantSetup {
        let admin_email = format!("admin@{name}.example");
        let owner_email = format!("owner@{name}.example");
        self.create_user(&admin_email, password, true).await;
        let admin = self.login(&admin_email, password, None).await;
        let created = admin
            .run(
                "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
                json!({ "input": { "name": name, "ownerEmail": owner_email, "ownerPassword": password } }),
            )
            .await;
        let tenant_id = created.data()["createTenant"]["id"]
            .as_str()
            .expect("tenant id")
            .to_owned();
        let owner = self.login(&owner_email, password, Some(&tenant_id)).await;
        let cluster = owner
            .run(
                "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }",
                json!({ "n": format!("{name}-cluster") }),
            )
            .await;
        let text = |v: &Value| v.as_str().expect("a string").to_owned();
        TenantSetup {
            tenant_id,
            owner_email,
            owner,
            cluster_id: text(&cluster.data()["createCluster"]["cluster"]["id"]),
            join_token: text(&cluster.data()["createCluster"]["joinToken"]),
        }
    }

    /// A client without a token. Its requests are bounded: a request the API never
    /// answers fails its test instead of hanging the suite.
    pub fn client(&self) -> Gql {
        Gql {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("an HTTP client"),
            url: self.url.clone(),
            token: None,
        }
    }

    /// Logs in and returns a client carrying the access token.
    pub async fn login(&self, email: &str, password: &str, tenant_id: Option<&str>) -> Gql {
        let response = self
            .client()
            .run(
                "mutation($e: String!, $p: String!, $t: ID) {
                    login(email: $e, password: $p, tenantId: $t) { accessToken }
                }",
                json!({ "e": email, "p": password, "t": tenant_id }),
            )
            .await;
        let token = response.data()["login"]["accessToken"]
            .as_str()
            .expect("token")
            .to_owned();
        self.client().with_token(&token)
    }
}

/// What [`TestApi::tenant_with_cluster`] made.
pub struct TenantSetup {
    pub tenant_id: String,
    pub owner_email: String,
    /// Logged in to the tenant.
    pub owner: Gql,
    pub cluster_id: String,
    pub join_token: String,
}

/// A GraphQL-over-HTTP client, as any user's would be.
#[derive(Clone)]
pub struct Gql {
    pub http: reqwest::Client,
    pub url: String,
    pub token: Option<String>,
}

/// The parsed answer: `data` and `errors` as the server sent them, and the HTTP status.
#[derive(Debug)]
pub struct GqlResponse {
    pub status: u16,
    pub body: Value,
}

impl GqlResponse {
    /// The data, panicking with the errors when there are any.
    pub fn data(&self) -> &Value {
        assert!(
            self.body
                .get("errors")
                .is_none_or(|e| e.as_array().is_none_or(|a| a.is_empty())),
            "unexpected GraphQL errors: {}",
            self.body
        );
        &self.body["data"]
    }

    /// The first error's `extensions.code`.
    pub fn code(&self) -> Option<&str> {
        self.body["errors"][0]["extensions"]["code"].as_str()
    }

    /// The code, panicking when the request did not fail.
    pub fn expect_code(&self) -> &str {
        self.code()
            .unwrap_or_else(|| panic!("expected an error, got {}", self.body))
    }

    pub fn message(&self) -> &str {
        self.body["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
    }
}

impl Gql {
    pub fn with_token(mut self, token: &str) -> Gql {
        self.token = Some(token.to_owned());
        self
    }

    fn request(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn run(&self, query: &str, variables: Value) -> GqlResponse {
        let builder = self
            .http
            .post(format!("{}/graphql", self.url))
            .json(&json!({ "query": query, "variables": variables }));
        Self::parse(self.request(builder).send().await.expect("request sent")).await
    }

    /// A GraphQL multipart request: `files` are (variable path such as
    /// `variables.file`, file name, bytes).
    pub async fn upload(
        &self,
        query: &str,
        variables: Value,
        files: Vec<(&str, &str, Vec<u8>)>,
    ) -> GqlResponse {
        let operations = json!({ "query": query, "variables": variables });
        let map: serde_json::Map<String, Value> = files
            .iter()
            .enumerate()
            .map(|(i, (path, _, _))| (i.to_string(), json!([path])))
            .collect();
        let mut form = reqwest::multipart::Form::new()
            .text("operations", operations.to_string())
            .text("map", Value::Object(map).to_string());
        for (i, (_, name, bytes)) in files.into_iter().enumerate() {
            form = form.part(
                i.to_string(),
                reqwest::multipart::Part::bytes(bytes).file_name(name.to_owned()),
            );
        }
        let builder = self
            .http
            .post(format!("{}/graphql", self.url))
            .multipart(form);
        Self::parse(self.request(builder).send().await.expect("request sent")).await
    }

    async fn parse(response: reqwest::Response) -> GqlResponse {
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        GqlResponse { status, body }
    }
}
