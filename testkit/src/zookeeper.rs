//! ZooKeeper for tests: a fresh chroot on the suite's server, or a server of the test's
//! own (restartable, or TLS-only with a throwaway certificate authority).

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
    /// The server's Java heap (`-Xmx`).
    heap: &'static str,
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
        Self::start_with_heap("128m").await
    }

    /// [`PrivateZooKeeper::start`] with a Java heap of `heap` (`-Xmx`, e.g. `1g`), for
    /// trees of hundreds of thousands of nodes (benchmarks).
    pub async fn start_with_heap(heap: &'static str) -> PrivateZooKeeper {
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
            heap,
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
            heap: "128m",
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
        command.arg(format!("-Xmx{}", self.heap));
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
