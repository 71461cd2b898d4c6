//! Retention prunes exactly what it should, in batches, on SQLite and on Postgres: runs
//! past their age or beyond a task's newest N, with their lines; the lines of runs past
//! the log horizon (the runs stay); audit entries past theirs; packages nothing refers
//! to. Never a run that has not ended, nor a task's newest ended run.

use chrono::{DateTime, Duration, Utc};
use cloudtask_catalogue::{
    Catalogue, ClusterHandle, NewPackage, NewTask, PageRequest, TenantHandle,
};
use cloudtask_core::archive::{ArchiveFormat, ArchiveSummary};
use cloudtask_core::ids::{ClusterId, RunId, TaskId};
use cloudtask_core::protocol::{Claim, Report};
use cloudtask_core::retention::{Pruned, Retention};
use cloudtask_core::run::{LogLine, LogStream, Outcome, RunStatus, RunTrigger};
use cloudtask_core::task::{TaskSpec, TaskState};

#[tokio::test]
async fn retention_prunes_what_it_should_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "cloudtask-retention-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}?mode=rwc", dir.join("catalogue.db").display());
    exercise(Catalogue::connect(&url).await.unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn retention_prunes_what_it_should_on_postgres() {
    let url = cloudtask_testkit::fresh_database().await;
    exercise(Catalogue::connect(&url).await.unwrap()).await;
}

/// Makes runs of one task on one cluster: each its own fire, ended or not.
struct Fires {
    cluster: ClusterHandle,
    task: TaskId,
    next: DateTime<Utc>,
}

impl Fires {
    /// A fire claimed; ended SUCCEEDED with three lines unless `running`.
    async fn run(&mut self, running: bool) -> RunId {
        self.next += Duration::seconds(1);
        let run = self
            .cluster
            .claim_run(&Claim {
                task_id: self.task,
                scheduled_at: self.next,
                attempt: 0,
                task_version: 1,
                worker: "w1".parse().unwrap(),
                trigger: RunTrigger::Schedule,
                status: RunStatus::Running,
                reason: None,
            })
            .await
            .unwrap();
        let lines = (0..3)
            .map(|offset| LogLine {
                offset,
                stream: LogStream::Stdout,
                at: Utc::now(),
                text: format!("line {offset}"),
            })
            .collect();
        let mut reports = vec![
            Report::Started {
                run: run.id,
                at: Utc::now(),
            },
            Report::Logs { run: run.id, lines },
        ];
        if !running {
            reports.push(Report::Finish {
                run: run.id,
                outcome: Outcome {
                    status: RunStatus::Succeeded,
                    exit_code: Some(0),
                    signal: None,
                    error: None,
                    finished_at: Utc::now(),
                    reason: None,
                },
            });
        }
        self.cluster.ingest_reports(&reports).await.unwrap();
        run.id
    }
}

/// A moment after everything made so far, and before everything made after (ids carry
/// their creation time to the millisecond).
async fn moment() -> DateTime<Utc> {
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let at = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    at
}

fn package(byte: u8) -> NewPackage {
    NewPackage {
        sha256: format!("{byte:02x}").repeat(32),
        summary: ArchiveSummary {
            format: ArchiveFormat::Zip,
            entries: 1,
            unpacked_bytes: 10,
        },
        content: vec![byte; 16],
    }
}

async fn task(
    handle: &TenantHandle,
    cluster: ClusterId,
    name: &str,
    with: Option<NewPackage>,
) -> TaskId {
    handle
        .create_task(
            NewTask {
                cluster_id: cluster,
                name: name.parse().unwrap(),
                description: String::new(),
                state: TaskState::Active,
                spec: TaskSpec::new("0 3 * * *", "echo hi"),
            },
            with,
        )
        .await
        .unwrap()
        .id
}

/// The runs of a task that are left, oldest first.
async fn left(handle: &TenantHandle, task: TaskId) -> Vec<RunId> {
    let mut runs: Vec<RunId> = handle
        .runs(
            &cloudtask_catalogue::RunFilter {
                task_id: Some(task),
                status: None,
            },
            PageRequest {
                first: 100,
                after: None,
            },
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|r| r.id)
        .collect();
    runs.sort();
    runs
}

async fn lines(handle: &TenantHandle, run: RunId) -> usize {
    handle.run_logs(run, 0, 100).await.unwrap().len()
}

async fn exercise(catalogue: Catalogue) {
    catalogue.migrate().await.unwrap();
    let (tenant, handle) = cloudtask_testkit::owned_tenant(&catalogue, "acme").await;
    let cluster = handle
        .create_cluster("main", "token-hash".into())
        .await
        .unwrap();
    let a = task(&handle, cluster.id, "a", Some(package(0xaa))).await;
    let b = task(&handle, cluster.id, "b", None).await;
    let gone = task(&handle, cluster.id, "gone", Some(package(0xbb))).await;
    let start = Utc::now() - Duration::hours(1);
    let mut fires_a = Fires {
        cluster: catalogue.cluster(cluster.id),
        task: a,
        next: start,
    };
    let mut fires_b = Fires {
        cluster: catalogue.cluster(cluster.id),
        task: b,
        next: start,
    };

    // Old: five ended runs of `a` and one still running; `b`'s only run.
    let mut old = Vec::new();
    for i in 0..6 {
        old.push(fires_a.run(i == 2).await);
    }
    let b_only = fires_b.run(false).await;
    let horizon = moment().await;
    let new = [fires_a.run(false).await, fires_a.run(false).await];

    // 1. A day's horizon, seen a day after `horizon`, in batches of 2.
    let day = Retention {
        run_days: Some(1),
        ..Retention::default()
    };
    let passes = catalogue
        .prune(&day, 2, horizon + Duration::days(1))
        .await
        .unwrap();
    let pruned = passes.iter().find(|(t, _)| *t == tenant.id).unwrap().1;
    assert_eq!((pruned.runs, pruned.log_lines), (5, 15), "{pruned:?}");
    assert_eq!(
        left(&handle, a).await,
        vec![old[2], new[0], new[1]],
        "the running run and the new ones stay"
    );
    assert_eq!(
        left(&handle, b).await,
        vec![b_only],
        "a task's newest ended run stays, however old"
    );
    assert_eq!(lines(&handle, old[2]).await, 3);
    // Recorded, and read back as the tenant sees it.
    let settings = handle.retention(&day).await.unwrap();
    assert_eq!(settings.last_prune, Some(pruned));
    assert_eq!(settings.held, day);

    // 2. The tenant's own cap, within the platform's: 2 runs per task.
    let platform = Retention {
        runs_per_task: Some(10),
        ..Retention::default()
    };
    let too_many = Retention {
        runs_per_task: Some(11),
        ..Retention::default()
    };
    assert!(matches!(
        handle.set_retention(too_many, &platform).await,
        Err(cloudtask_core::Error::BadInput { .. })
    ));
    let own = Retention {
        runs_per_task: Some(2),
        ..Retention::default()
    };
    handle.set_retention(own, &platform).await.unwrap();
    let newest = fires_a.run(false).await;
    // `a`: running, new[0], new[1], newest. Beyond the newest 2: new[0] (and the running
    // run, which stays).
    let passes = catalogue.prune(&platform, 2, Utc::now()).await.unwrap();
    let pruned = passes.iter().find(|(t, _)| *t == tenant.id).unwrap().1;
    assert_eq!((pruned.runs, pruned.log_lines), (1, 3), "{pruned:?}");
    assert_eq!(left(&handle, a).await, vec![old[2], new[1], newest]);

    // 3. Lines past their horizon go, their runs stay; a second pass finds nothing.
    let logs = Retention {
        log_days: Some(1),
        ..Retention::default()
    };
    let later = Utc::now() + Duration::days(2);
    let passes = catalogue.prune(&logs, 2, later).await.unwrap();
    let pruned = passes.iter().find(|(t, _)| *t == tenant.id).unwrap().1;
    assert_eq!((pruned.runs, pruned.log_lines), (0, 3), "{pruned:?}");
    assert_eq!(left(&handle, a).await, vec![old[2], new[1], newest]);
    assert_eq!(lines(&handle, new[1]).await, 0);
    assert!(handle.run(new[1]).await.unwrap().logs_pruned_at.is_some());
    assert_eq!(
        lines(&handle, newest).await,
        3,
        "the newest ended run keeps its lines"
    );
    assert_eq!(
        lines(&handle, old[2]).await,
        3,
        "a running run keeps its lines"
    );
    assert!(handle.run(newest).await.unwrap().logs_pruned_at.is_none());
    let passes = catalogue.prune(&logs, 2, later).await.unwrap();
    let pruned = passes.iter().find(|(t, _)| *t == tenant.id).unwrap().1;
    assert!(pruned.is_empty(), "{pruned:?}");

    // 4. Audit entries past their horizon; a package nothing refers to any more.
    handle.delete_task(gone).await.unwrap();
    let audit = Retention {
        audit_days: Some(1),
        ..Retention::default()
    };
    let before = handle
        .audit_log(PageRequest {
            first: 100,
            after: None,
        })
        .await
        .unwrap()
        .items
        .len() as u64;
    assert!(before >= 5);
    let passes = catalogue.prune(&audit, 2, later).await.unwrap();
    let pruned: Pruned = passes.iter().find(|(t, _)| *t == tenant.id).unwrap().1;
    assert_eq!(
        (pruned.audit_entries, pruned.packages),
        (before, 1),
        "{pruned:?}"
    );
    assert!(
        handle.package(&package(0xbb).sha256).await.is_err(),
        "the unused package is gone"
    );
    handle.package(&package(0xaa).sha256).await.unwrap();
    assert_eq!(left(&handle, b).await, vec![b_only]);
}
