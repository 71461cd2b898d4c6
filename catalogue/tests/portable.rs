//! The catalogue is portable: the same migrations and tenant-scoped code run on SQLite
//! (the standalone mode's database, a file as standalone uses it) and on Postgres (a
//! fresh database); the same checks run on both.

use cloudtask_catalogue::{Catalogue, NewTask, NewUser, PageRequest, RunFilter, Scope, TaskFilter};
use cloudtask_core::roles::Role;
use cloudtask_core::run::{Claim, LogLine, LogStream, Outcome, Report, RunStatus, RunTrigger};
use cloudtask_core::task::{TaskSpec, TaskState};

#[tokio::test]
async fn the_catalogue_works_on_sqlite() {
    let dir = std::env::temp_dir().join(format!(
        "cloudtask-catalogue-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}?mode=rwc", dir.join("catalogue.db").display());
    exercise(Catalogue::connect(&url).await.unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_catalogue_works_on_postgres() {
    let url = cloudtask_testkit::fresh_database().await;
    exercise(Catalogue::connect(&url).await.unwrap()).await;
}

async fn exercise(catalogue: Catalogue) {
    catalogue.migrate().await.unwrap();
    catalogue.migrate().await.unwrap(); // twice is a no-op

    let admin = catalogue
        .create_user(NewUser {
            email: "Admin@Example.com".into(),
            password_hash: "x".into(),
            platform_admin: true,
        })
        .await
        .unwrap();
    assert_eq!(admin.email, "admin@example.com");
    let actor = admin.id.to_string();
    let tenant = catalogue
        .create_tenant(
            (admin.id, &actor),
            "acme",
            "owner@acme.example",
            Some("hash".into()),
        )
        .await
        .unwrap();
    let owner = catalogue
        .user_credentials("owner@acme.example")
        .await
        .unwrap()
        .unwrap()
        .user;
    assert_eq!(
        catalogue.role_in(owner.id, tenant.id).await.unwrap(),
        Some(Role::Owner)
    );

    let handle = catalogue
        .tenant(Scope {
            tenant_id: tenant.id,
            user_id: owner.id,
            actor: "owner".into(),
        })
        .await
        .unwrap();
    let cluster = handle
        .create_cluster("main", "token-hash".into())
        .await
        .unwrap();
    let task = handle
        .create_task(
            NewTask {
                cluster_id: cluster.id,
                name: "nightly".into(),
                description: String::new(),
                state: TaskState::Active,
                spec: TaskSpec::new("0 3 * * *", "echo hi"),
            },
            None,
        )
        .await
        .unwrap();
    let updated = handle
        .update_task(task.id, |edit| {
            edit.spec.command = "echo changed".into();
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(handle.task_versions(task.id).await.unwrap().len(), 2);
    let page = handle
        .tasks(
            &TaskFilter::default(),
            PageRequest {
                first: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(!page.has_next);

    // Runs: a claim is taken once per fire; reports land once; reads are scoped.
    let fire = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let claim = Claim {
        task_id: task.id,
        scheduled_at: fire,
        attempt: 0,
        task_version: 2,
        worker: "w1".into(),
        trigger: RunTrigger::Schedule,
        status: RunStatus::Running,
        reason: None,
    };
    let run = catalogue.claim_run(cluster.id, &claim).await.unwrap();
    // The same worker asking again (its answer lost) gets the same run; another worker
    // is refused.
    let again = catalogue.claim_run(cluster.id, &claim).await.unwrap();
    assert_eq!(again.id, run.id);
    let other = Claim {
        worker: "w2".into(),
        ..claim.clone()
    };
    let refused = catalogue.claim_run(cluster.id, &other).await;
    assert!(
        matches!(refused, Err(cloudtask_core::Error::Conflict(_))),
        "a second claim of one fire: {refused:?}"
    );
    let line = |offset: u64, text: &str| LogLine {
        offset,
        stream: LogStream::Stdout,
        at: chrono::Utc::now(),
        text: text.into(),
    };
    let reports = vec![
        Report::Logs {
            run: run.id,
            lines: vec![line(0, "one"), line(1, "two")],
        },
        Report::Finish {
            run: run.id,
            outcome: Outcome {
                status: RunStatus::Succeeded,
                exit_code: Some(0),
                signal: None,
                error: None,
                finished_at: chrono::Utc::now(),
            },
        },
    ];
    catalogue
        .ingest_reports(cluster.id, &reports)
        .await
        .unwrap();
    catalogue
        .ingest_reports(cluster.id, &reports)
        .await
        .unwrap(); // delivered twice
    let logs = handle.run_logs(run.id, 0, 100).await.unwrap();
    assert_eq!(
        logs.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    let runs = handle
        .runs(
            &RunFilter::default(),
            PageRequest {
                first: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(runs.items.len(), 1);
    assert_eq!(runs.items[0].status, RunStatus::Succeeded);
    let queued = handle.queue_run(task.id).await.unwrap();
    assert_eq!(queued.status, RunStatus::Queued);
    let (pending, _) = catalogue.pending_commands(cluster.id).await.unwrap();
    assert_eq!(pending.len(), 1);
    let stopped = handle.request_stop(queued.id).await.unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert!(matches!(
        handle.delete_cluster(cluster.id).await,
        Err(cloudtask_core::Error::Conflict(_))
    ));
    handle.delete_task(task.id).await.unwrap();
    handle.delete_cluster(cluster.id).await.unwrap();
    assert!(
        handle
            .audit_log(PageRequest {
                first: 50,
                after: None
            })
            .await
            .unwrap()
            .items
            .len()
            >= 5
    );
}
