//! Test-only helpers: a fresh Postgres database per test, the real API on port 0, and a
//! small GraphQL client (JSON and multipart uploads).

mod smtp;
mod socket;
mod stand_in;
pub mod stats;

use std::sync::Arc;

use cloudtask_api::AppState;
use cloudtask_catalogue::{Catalogue, NewUser};
use cloudtask_core::config::Config;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use smtp::{Mail, SmtpSink};
pub use socket::{Closed, GqlSocket, Reply};
pub use stand_in::stand_in_api;

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

/// A ZooKeeper connect string with a fresh chroot: `CLOUDTASK_TEST_ZOOKEEPER` (default
/// `127.0.0.1:2181`) plus `/cloudtask_test_<uuid>`, so tests run in parallel unaware of
/// each other. The chroot is created on first connect.
pub fn fresh_zookeeper() -> String {
    let server =
        std::env::var("CLOUDTASK_TEST_ZOOKEEPER").unwrap_or_else(|_| "127.0.0.1:2181".into());
    format!("{server}/cloudtask_test_{}", uuid::Uuid::new_v4().simple())
}

/// A ZooKeeper server of the test's own (standalone, loopback, its own data folder), for
/// tests that stop and restart the server and so must not share the suite's, or that
/// need it configured otherwise (TLS only: [`PrivateZooKeeper::start_tls`]).
pub struct PrivateZooKeeper {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// The CA that signed the server's certificate, when it serves TLS only.
    tls: Option<TestCa>,
}

/// The jars a Netty (TLS) server needs besides ZooKeeper's own (Debian's `netty-all.jar`
/// is an empty aggregate).
const NETTY_JARS: [&str; 8] = [
    "netty-buffer",
    "netty-codec",
    "netty-common",
    "netty-handler",
    "netty-resolver",
    "netty-transport",
    "netty-transport-native-epoll",
    "netty-transport-native-unix-common",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PrivateZooKeeper {
    pub async fn start() -> PrivateZooKeeper {
        let port = free_port();
        let dir = Self::folder();
        Self::write_config(
            &dir,
            &format!("clientPort={port}\nclientPortAddress=127.0.0.1\n"),
        );
        let mut zk = PrivateZooKeeper {
            port,
            dir,
            child: None,
            tls: None,
        };
        zk.restart().await;
        zk
    }

    /// A server reachable over TLS only: `port` is its `secureClientPort` (Netty), there
    /// is no plain client port, and clients are not asked for certificates. Its
    /// certificate (for `127.0.0.1` and `localhost`) is signed by a CA made for this
    /// server alone ([`PrivateZooKeeper::ca_file`]); keys stay in the server's folder,
    /// removed with it.
    pub async fn start_tls() -> PrivateZooKeeper {
        let port = free_port();
        let dir = Self::folder();
        let ca = TestCa::new(&dir.join("ca"));
        let keystore = ca.issue_server(&dir.join("server"), "127.0.0.1");
        Self::write_config(
            &dir,
            &format!(
                "secureClientPort={port}\nsecureClientPortAddress=127.0.0.1\n\
                 serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                 ssl.keyStore.location={}\nssl.keyStore.type=PEM\nssl.keyStore.password=\n\
                 ssl.clientAuth=none\n",
                keystore.display()
            ),
        );
        let mut zk = PrivateZooKeeper {
            port,
            dir,
            child: None,
            tls: Some(ca),
        };
        zk.restart().await;
        zk
    }

    fn folder() -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cloudtask-zk-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).expect("zookeeper folder");
        dir
    }

    fn write_config(dir: &std::path::Path, listen: &str) {
        std::fs::write(
            dir.join("zoo.cfg"),
            format!(
                "tickTime=500\ndataDir={}\n{listen}\
                 minSessionTimeout=1000\nmaxSessionTimeout=60000\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok\n",
                dir.join("data").display()
            ),
        )
        .expect("zoo.cfg");
    }

    /// `127.0.0.1:<port><chroot>`; `tcp+tls://127.0.0.1:<port><chroot>` for a TLS server.
    pub fn connect_string(&self, chroot: &str) -> String {
        let scheme = if self.tls.is_some() { "tcp+tls://" } else { "" };
        format!("{scheme}127.0.0.1:{}{chroot}", self.port)
    }

    /// The PEM file of the CA that signed a TLS server's certificate (`zookeeper_tls_ca`).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().map(|ca| ca.cert.as_path())
    }

    /// The server's log (for a failing test's message).
    pub fn log_file(&self) -> std::path::PathBuf {
        self.dir.join("zk.log")
    }

    /// Kills the server (as a crash would) and keeps its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port and data, and waits until it serves.
    pub async fn restart(&mut self) {
        self.stop();
        let mut classpath = String::from("/usr/share/java/zookeeper.jar");
        let netty = NETTY_JARS.map(|jar| format!("/usr/share/java/{jar}.jar"));
        let extra: &[String] = if self.tls.is_some() { &netty } else { &[] };
        for jar in [
            "/usr/share/java/slf4j-api.jar",
            "/usr/share/java/slf4j-simple.jar",
        ]
        .into_iter()
        .chain(extra.iter().map(String::as_str))
        {
            if std::path::Path::new(jar).exists() {
                classpath.push(':');
                classpath.push_str(jar);
            }
        }
        let log = std::fs::File::create(self.log_file()).expect("zk log");
        let mut command = std::process::Command::new("java");
        command.arg("-Xmx128m");
        if self.tls.is_some() {
            command.arg(
                "-Dzookeeper.serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            );
        }
        let child = command
            .args([
                "-cp",
                &classpath,
                "org.apache.zookeeper.server.ZooKeeperServerMain",
            ])
            .arg(self.dir.join("zoo.cfg"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect(
                "java starts (is the zookeeper package installed? scripts/ensure-zookeeper.sh)",
            );
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let serving = match &self.tls {
                None => self.ruok().await,
                Some(ca) => self.ruok_tls(ca).await,
            };
            if serving {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private ZooKeeper did not start; see {}",
                self.dir.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Whether the port answers `ruok` in clear (a TLS-only server does not).
    pub async fn ruok(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if stream.write_all(b"ruok").await.is_err() {
            return false;
        }
        let mut answer = String::new();
        let read = stream.read_to_string(&mut answer);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
        answer == "imok"
    }

    /// `ruok` over TLS, the server verified against `ca` (the `openssl` command).
    async fn ruok_tls(&self, ca: &TestCa) -> bool {
        use tokio::io::AsyncWriteExt;
        let Ok(mut child) = tokio::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-ign_eof", "-verify_return_error"])
            .arg("-connect")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("-CAfile")
            .arg(&ca.cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
        else {
            return false;
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"ruok").await;
        }
        let output = child.wait_with_output();
        match tokio::time::timeout(std::time::Duration::from_secs(3), output).await {
            Ok(Ok(output)) => String::from_utf8_lossy(&output.stdout).contains("imok"),
            _ => false,
        }
    }
}

/// A throwaway certificate authority made with the `openssl` command (P-256 keys, valid
/// for two days), for TLS servers in tests.
pub struct TestCa {
    /// Its certificate, PEM: what clients trust.
    pub cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// `openssl` with the words of `command` and then `args`, in `dir`.
fn openssl(dir: &std::path::Path, command: &str, args: &[&std::ffi::OsStr]) {
    let output = std::process::Command::new("openssl")
        .args(command.split_whitespace())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command runs");
    assert!(
        output.status.success(),
        "openssl {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A P-256 key, in `openssl req` words.
const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

impl TestCa {
    /// A new CA (a name of its own), its key and certificate in `dir` (created).
    pub fn new(dir: &std::path::Path) -> TestCa {
        std::fs::create_dir_all(dir).expect("CA folder");
        openssl(
            dir,
            &format!(
                "req -x509 {EC_KEY} -keyout ca.key -out ca.pem -days 2 \
                 -subj /CN=cloudtask-test-ca-{} -addext basicConstraints=critical,CA:TRUE \
                 -addext keyUsage=critical,keyCertSign,cRLSign",
                uuid::Uuid::new_v4().simple()
            ),
            &[],
        );
        TestCa {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        }
    }

    /// A server certificate for `ip` (and `localhost`) signed by this CA; returns the PEM
    /// file holding its private key (PKCS#8) followed by the certificate, in `dir`.
    pub fn issue_server(&self, dir: &std::path::Path, ip: &str) -> std::path::PathBuf {
        std::fs::create_dir_all(dir).expect("server certificate folder");
        std::fs::write(
            dir.join("ext.cnf"),
            format!(
                "subjectAltName=IP:{ip},DNS:localhost\nextendedKeyUsage=serverAuth\n\
                 basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            ),
        )
        .expect("extensions");
        openssl(
            dir,
            &format!("req {EC_KEY} -keyout server.key -out server.csr -subj /CN={ip}"),
            &[],
        );
        openssl(
            dir,
            "x509 -req -in server.csr -CAcreateserial -out server.pem -days 2 -extfile ext.cnf",
            &[
                "-CA".as_ref(),
                self.cert.as_os_str(),
                "-CAkey".as_ref(),
                self.key.as_os_str(),
            ],
        );
        let mut keystore = std::fs::read(dir.join("server.key")).expect("server key");
        keystore.extend(std::fs::read(dir.join("server.pem")).expect("server certificate"));
        let path = dir.join("keystore.pem");
        std::fs::write(&path, keystore).expect("keystore");
        path
    }
}

impl Drop for PrivateZooKeeper {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of a server (ZooKeeper, the API) that can cut the connections going through it and
/// refuse new ones: a deterministic connection loss, and, held long enough, an expiry.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: Arc<std::sync::Mutex<ProxyState>>,
}

struct ProxyState {
    open: bool,
    connections: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(std::sync::Mutex::new(ProxyState {
            open: true,
            connections: CancellationToken::new(),
        }));
        let upstream = upstream.to_owned();
        let accepting = state.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (open, cut) = {
                    let state = accepting.lock().expect("proxy state");
                    (state.open, state.connections.clone())
                };
                if !open {
                    continue; // dropped: the connection is refused
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { addr, state }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        let mut state = self.state.lock().expect("proxy state");
        state.open = false;
        state.connections.cancel();
        state.connections = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").open = true;
    }
}
