//! A tenant's task, on a real worker, tries what a hostile program would: the server's
//! secrets (the access-token secret and the catalogue of standalone, the worker's and the
//! server's environment through /proc) and another tenant's folders. Every attempt fails,
//! the task's environment holds nothing of the server's, and it runs as an unprivileged
//! user of its cluster's own; its own package stays readable and its folder writable.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudtask_core::archive::samples;
use cloudtask_testkit::Gql;
use serde_json::{Value, json};

use crate::harness::Cluster;
use crate::support::PASSWORD;

/// The default `run_user` range: a root worker's runs take an id from it.
const RUN_UIDS: std::ops::RangeInclusive<u32> = 1_700_000_000..=1_700_099_999;

/// A shell script that prints the run's user id, then `read <path>` or `denied <path>`
/// (the path as given, before the shell expands it) for each file it tries to `cat` and
/// each folder it tries to `ls`, then its environment.
fn probe(files: &[&str], folders: &[&str]) -> String {
    let mut script = String::from(
        "try() { l=$1; shift; if \"$@\" >/dev/null 2>&1; then echo \"read $l\"; else echo \"denied $l\"; fi; }\n\
         id -u\n",
    );
    for file in files {
        script.push_str(&format!("try '{file}' cat \"{file}\"\n"));
    }
    for folder in folders {
        script.push_str(&format!("try '{folder}' ls \"{folder}\"\n"));
    }
    script.push_str("echo -- env --\nenv\n");
    script
}

/// What a [`probe`] printed.
#[derive(Debug)]
struct Probed {
    uid: u32,
    read: Vec<String>,
    denied: Vec<String>,
    env: BTreeMap<String, String>,
}

fn probed(run: &Value) -> Probed {
    let texts: Vec<&str> = run["logs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logs: {run:#}"))
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    let uid = texts
        .first()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no user id first: {texts:?}"));
    let pick = |prefix: &str| -> Vec<String> {
        texts
            .iter()
            .filter_map(|t| t.strip_prefix(prefix))
            .map(str::to_owned)
            .collect()
    };
    let env = texts
        .iter()
        .skip_while(|t| **t != "-- env --")
        .skip(1)
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Probed {
        uid,
        read: pick("read "),
        denied: pick("denied "),
        env,
    }
}

/// The environment a run may have: the run's identity, the task's env, the few
/// variables of the worker's named in the README, and what `sh` sets itself.
fn assert_minimal_env(env: &BTreeMap<String, String>, task_env: &[&str], secrets: &[&str]) {
    let allowed = [
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "HOME",
        "TMPDIR",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "CLOUDTASK_RUN_ID",
        "CLOUDTASK_TASK_ID",
        "CLOUDTASK_SCHEDULED_AT",
        "CLOUDTASK_ATTEMPT",
    ];
    for key in env.keys() {
        assert!(
            allowed.contains(&key.as_str()) || task_env.contains(&key.as_str()),
            "the run sees {key} of the server's environment: {env:#?}"
        );
    }
    for secret in secrets {
        assert!(
            env.values().all(|v| !v.contains(secret)),
            "a secret of the server reached the run: {env:#?}"
        );
    }
}

const CREATE: &str = "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }";

/// A task of `owner` on `cluster` with a one-file package; returns its id.
async fn packaged_task(
    owner: &Gql,
    cluster: &str,
    name: &str,
    command: &str,
    file: &str,
) -> String {
    let package = samples::tar_gz_of(&[(file, b"the tenant's own file\n", 0o644)]);
    let created = owner
        .upload(
            CREATE,
            json!({ "input": {
                "clusterId": cluster, "name": name, "schedule": "0 0 1 1 *",
                "command": command, "package": null, "env": [{ "name": "PROBE", "value": "1" }],
            } }),
            vec![("variables.input.package", "p.tar.gz", package)],
        )
        .await;
    created.data()["createTask"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", created.body))
        .to_owned()
}

/// Runs the task now, once it has a worker, and waits (bounded) for the run's end.
async fn run_to_end(owner: &Gql, task: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    let run_id = loop {
        let queued = owner
            .run(
                "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
                json!({ "id": task }),
            )
            .await;
        if let Some(id) = queued.data()["runTaskNow"]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "never run: {}", queued.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    loop {
        let run = owner
            .run(
                "query($id: ID!) { run(id: $id) { status error logs(limit: 1000) { text } } }",
                json!({ "id": run_id }),
            )
            .await;
        let run = run.data()["run"].clone();
        if !matches!(run["status"].as_str(), Some("QUEUED" | "RUNNING") | None) {
            return run;
        }
        assert!(Instant::now() < deadline, "the run never ended: {run:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256(file: &str) -> String {
    use sha2::Digest;
    let package = samples::tar_gz_of(&[(file, b"the tenant's own file\n", 0o644)]);
    hex::encode(sha2::Sha256::digest(&package))
}

#[tokio::test]
async fn a_task_on_a_root_worker_reaches_no_secret_of_the_worker_and_nothing_of_another_tenant() {
    let mut cluster = Cluster::start().await;
    let other = cluster.api.tenant_with_cluster("other", PASSWORD).await;
    let zookeeper = cluster.zookeeper.clone();
    cluster.spawn_worker_process_for("wb", &zookeeper, &other.join_token);
    cluster.spawn_worker_process("wa");

    // The other tenant's task has run: its package folder is there, with its file.
    let theirs = packaged_task(
        &other.owner,
        &other.cluster_id,
        "theirs",
        &probe(&["./b.txt"], &[]),
        "b.txt",
    )
    .await;
    let their_run = run_to_end(&other.owner, &theirs).await;
    assert_eq!(their_run["status"], "SUCCEEDED", "{their_run:#}");
    let their_probe = probed(&their_run);
    assert_eq!(their_probe.read, ["./b.txt"], "{their_probe:?}");
    let their_folder = cluster.packages_of(&other.cluster_id, "wb");
    let their_file = their_folder.join(sha256("b.txt")).join("b.txt");
    assert!(
        their_file.exists(),
        "{} is where it is",
        their_file.display()
    );

    let worker_data = cluster.data.path().join("wa");
    let (their_file, their_cluster, worker_log, worker_data) = (
        their_file.display().to_string(),
        cluster
            .runs
            .path()
            .join(&other.cluster_id)
            .display()
            .to_string(),
        worker_data.join("worker.log").display().to_string(),
        worker_data.display().to_string(),
    );
    let files = [
        their_file.as_str(),
        worker_log.as_str(),
        "/proc/$PPID/environ",
        "/proc/$PPID/maps",
        "./a.txt",
    ];
    let folders = [
        their_cluster.as_str(),
        worker_data.as_str(),
        "/proc/$PPID/fd",
    ];
    let ours = packaged_task(
        &cluster.owner,
        &cluster.cluster_id,
        "ours",
        &format!("{}touch made-here && echo wrote\n", probe(&files, &folders)),
        "a.txt",
    )
    .await;
    let run = run_to_end(&cluster.owner, &ours).await;
    assert_eq!(run["status"], "SUCCEEDED", "{run:#}");
    let ours = probed(&run);
    assert_eq!(ours.read, ["./a.txt"], "only its own file: {ours:?}");
    let mut expected_denied: Vec<String> = files[..4].iter().map(|f| f.to_string()).collect();
    expected_denied.extend(folders.iter().map(|f| f.to_string()));
    assert_eq!(ours.denied, expected_denied, "{ours:?}");
    assert!(
        run["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["text"] == "wrote"),
        "its working folder is its own: {run:#}"
    );

    // Unprivileged, and not the other tenant's user.
    assert!(RUN_UIDS.contains(&ours.uid), "{ours:?}");
    assert!(RUN_UIDS.contains(&their_probe.uid), "{their_probe:?}");
    assert_ne!(ours.uid, their_probe.uid, "one user per cluster");
    assert_minimal_env(
        &ours.env,
        &["PROBE"],
        &[&cluster.join_token, &other.join_token],
    );
    let home = cluster
        .runs
        .path()
        .join(&cluster.cluster_id)
        .join("wa/home");
    assert_eq!(ours.env["HOME"], home.display().to_string());
    assert!(!ours.env.contains_key("CLOUDTASK_CLUSTER_TOKEN"));
}

/// Starts `cloudtask standalone` in `dir` (through `wrapper`, e.g. `setpriv …`, if
/// given) and waits for its banner; returns the process and the API's URL.
fn start_standalone(
    dir: &Path,
    binary: &Path,
    wrapper: &[String],
    run_dir: &Path,
) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("standalone")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLOUDTASK_LISTEN", "127.0.0.1:0")
        .env("CLOUDTASK_ADMIN_PASSWORD", PASSWORD)
        .env("CLOUDTASK_RUN_DIR", run_dir)
        .env("CLOUDTASK_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cloudtask standalone");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("standalone printed its banner")
            .unwrap();
        if let Some(rest) = line.trim().strip_prefix("GraphQL API and GraphiQL: ") {
            break rest.trim_end_matches("/graphql").to_owned();
        }
    };
    // Keep reading its output (it would block on a full pipe otherwise).
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

/// The standalone cluster's id.
async fn local_cluster(owner: &Gql) -> String {
    let clusters = owner.run("{ clusters { id name } }", json!({})).await;
    assert_eq!(clusters.data()["clusters"][0]["name"], "local");
    clusters.data()["clusters"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_task_of_root_standalone_reads_neither_its_secrets_nor_its_catalogue_nor_its_environment()
{
    let dir = tempfile::tempdir().unwrap();
    let runs = crate::harness::run_dir();
    let binary = Path::new(env!("CARGO_BIN_EXE_cloudtask"));
    let (child, url) = start_standalone(dir.path(), binary, &[], runs.path());
    let owner = crate::standalone::login(&url).await;
    let cluster = local_cluster(&owner).await;

    let data = dir.path().join("cloudtask-data");
    let (secret, catalogue) = (data.join("jwt-secret"), data.join("cloudtask.db"));
    let (secret, catalogue, wal) = (
        secret.display().to_string(),
        catalogue.display().to_string(),
        data.join("cloudtask.db-wal").display().to_string(),
    );
    // The attack (relative to where runs used to work) and the absolute paths.
    let files = [
        "../../../jwt-secret",
        "../../../cloudtask.db",
        secret.as_str(),
        catalogue.as_str(),
        wal.as_str(),
        "/proc/$PPID/environ",
        "./mine.txt",
    ];
    let data_text = data.display().to_string();
    let task = packaged_task(
        &owner,
        &cluster,
        "probe",
        &probe(&files, &[data_text.as_str()]),
        "mine.txt",
    )
    .await;
    let run = run_to_end(&owner, &task).await;
    assert_eq!(run["status"], "SUCCEEDED", "{run:#}");
    let seen = probed(&run);
    assert_eq!(seen.read, ["./mine.txt"], "{seen:?}");
    assert_eq!(seen.denied.len(), files.len(), "{seen:?}");
    assert!(RUN_UIDS.contains(&seen.uid), "{seen:?}");
    assert_minimal_env(&seen.env, &["PROBE"], &[PASSWORD]);
    assert!(!seen.env.contains_key("CLOUDTASK_ADMIN_PASSWORD"));

    // The files themselves: the server's user's alone.
    assert_eq!(mode(&data), 0o700);
    for file in [
        "jwt-secret",
        "cloudtask.db",
        "cloudtask.db-wal",
        "cloudtask.db-shm",
    ] {
        let path = data.join(file);
        // The catalogue is in WAL mode: -wal and -shm are there while it is open.
        assert_eq!(mode(&path), 0o600, "{file}");
    }
    crate::standalone::terminate(child);

    // Made readable by hand, they are tightened again at the next start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("jwt-secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (child, _) = start_standalone(dir.path(), binary, &[], runs.path());
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("jwt-secret")), 0o600);
    crate::standalone::terminate(child);
}

/// A user id that is nobody's on this machine (and outside the `run_user` range).
const NOT_ROOT: u32 = 1_699_999_001;

#[tokio::test]
async fn a_task_of_a_standalone_that_is_not_root_cannot_read_the_server_through_proc() {
    if !nix_is_root() {
        eprintln!("skipped: needs root to start the server as another user");
        return;
    }
    // The server runs as an ordinary user, from a folder of its own (the build's
    // folder may be closed to that user); its tasks run as that same user.
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("cloudtask");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_cloudtask"), &binary).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_cloudtask"), &binary).unwrap();
    }
    let runs = dir.path().join("runs");
    for path in [dir.path(), binary.as_path()] {
        std::os::unix::fs::chown(path, Some(NOT_ROOT), Some(NOT_ROOT)).unwrap();
    }
    let wrapper: Vec<String> = [
        "setpriv",
        &format!("--reuid={NOT_ROOT}"),
        &format!("--regid={NOT_ROOT}"),
        "--clear-groups",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (child, url) = start_standalone(dir.path(), &binary, &wrapper, &runs);
    let owner = crate::standalone::login(&url).await;
    let cluster = local_cluster(&owner).await;
    // A process of the same user that is not sealed: its environment is readable, so a
    // denial of the server's is the server's own doing.
    let command = format!(
        "sleep 30 & {}kill $!\n",
        probe(
            &[
                "/proc/$!/environ",
                "/proc/$PPID/environ",
                "/proc/$PPID/maps"
            ],
            &["/proc/$!/fd", "/proc/$PPID/fd"]
        )
    );
    let task = packaged_task(&owner, &cluster, "probe", &command, "mine.txt").await;
    let run = run_to_end(&owner, &task).await;
    assert_eq!(run["status"], "SUCCEEDED", "{run:#}");
    let seen = probed(&run);
    assert_eq!(seen.uid, NOT_ROOT, "the server's own user: {seen:?}");
    assert_eq!(seen.read, ["/proc/$!/environ", "/proc/$!/fd"], "{seen:?}");
    assert_eq!(
        seen.denied,
        ["/proc/$PPID/environ", "/proc/$PPID/maps", "/proc/$PPID/fd"],
        "{seen:?}"
    );
    assert_minimal_env(&seen.env, &["PROBE"], &[PASSWORD]);
    crate::standalone::terminate(child);
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}
