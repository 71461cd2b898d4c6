//! The catalogue is portable: the same migrations and tenant-scoped code run on SQLite
//! (the standalone mode's database, a file as standalone uses it) and on Postgres (a
//! fresh database); the same checks run on both.

use cloudtask_catalogue::{Catalogue, NewTask, NewUser, PageRequest, RunFilter, Scope, TaskFilter};
use cloudtask_core::protocol::{Claim, Report};
use cloudtask_core::roles::Role;
use cloudtask_core::run::{LogLine, LogStream, Outcome, RunStatus, RunTrigger};
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

fn succeeded() -> Outcome {
    Outcome {
        status: RunStatus::Succeeded,
        exit_code: Some(0),
        signal: None,
        error: None,
        finished_at: chrono::Utc::now(),
        reason: None,
    }
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
                name: "nightly".parse().unwrap(),
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
        worker: "w1".parse().unwrap(),
        trigger: RunTrigger::Schedule,
        status: RunStatus::Running,
        reason: None,
    };
    let run = catalogue
        .cluster(cluster.id)
        .claim_run(&claim)
        .await
        .unwrap();
    // The same worker asking again (its answer lost) gets the same run; another worker
    // is refused.
    let again = catalogue
        .cluster(cluster.id)
        .claim_run(&claim)
        .await
        .unwrap();
    assert_eq!(again.id, run.id);
    let other = Claim {
        worker: "w2".parse().unwrap(),
        ..claim.clone()
    };
    let refused = catalogue.cluster(cluster.id).claim_run(&other).await;
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
            outcome: succeeded(),
        },
    ];
    catalogue
        .cluster(cluster.id)
        .ingest_reports(&reports)
        .await
        .unwrap();
    catalogue
        .cluster(cluster.id)
        .ingest_reports(&reports)
        .await
        .unwrap(); // delivered twice
    // Claims in one batch are answered one by one, in order.
    let second = chrono::Duration::seconds(1);
    let next = Claim {
        scheduled_at: fire + second,
        ..claim.clone()
    };
    let batch = [
        next.clone(),
        next.clone(), // twice in one batch: the same worker gets the same run
        Claim {
            scheduled_at: fire + second * 2,
            task_version: 1,
            ..claim.clone()
        },
        Claim {
            scheduled_at: fire + second * 3,
            status: RunStatus::Skipped,
            reason: Some("overlap".into()),
            ..claim.clone()
        },
        other.clone(),
        Claim {
            task_id: cloudtask_core::ids::TaskId::new(),
            ..claim.clone()
        },
    ];
    let answers = catalogue
        .cluster(cluster.id)
        .claim_runs(&batch)
        .await
        .unwrap();
    assert_eq!(answers.len(), batch.len());
    let next_run = answers[0].as_ref().unwrap().clone();
    assert_eq!(next_run.status, RunStatus::Running);
    assert_eq!(answers[1].as_ref().unwrap().id, next_run.id);
    assert!(
        matches!(&answers[2], Err(cloudtask_core::Error::Conflict(m)) if m.contains("stale")),
        "{:?}",
        answers[2]
    );
    let skipped = answers[3].as_ref().unwrap();
    assert_eq!(skipped.status, RunStatus::Skipped);
    assert_eq!(skipped.error.as_deref(), Some("overlap"));
    assert!(matches!(
        answers[4],
        Err(cloudtask_core::Error::Conflict(_))
    ));
    assert!(matches!(
        answers[5],
        Err(cloudtask_core::Error::NotFound(_))
    ));
    // Starts and outcomes of several runs in one batch land on each run.
    let started_at = chrono::Utc::now();
    catalogue
        .cluster(cluster.id)
        .ingest_reports(&[
            Report::Started {
                run: next_run.id,
                at: started_at,
            },
            Report::Finish {
                run: next_run.id,
                outcome: Outcome {
                    status: RunStatus::Failed,
                    exit_code: Some(3),
                    signal: None,
                    error: Some("exit code 3".into()),
                    finished_at: chrono::Utc::now(),
                    reason: None,
                },
            },
            // An outcome for a run that has one already changes nothing.
            Report::Finish {
                run: skipped.id,
                outcome: succeeded(),
            },
        ])
        .await
        .unwrap();
    let failed = handle.run(next_run.id).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.error.as_deref(), Some("exit code 3"));
    assert!(failed.started_at.is_some());
    assert_eq!(
        handle.run(skipped.id).await.unwrap().status,
        RunStatus::Skipped
    );
    // Fires claimed ahead and not started: SKIPPED when they were due, gone when they
    // were not (the task changed after the claim).
    let ahead = catalogue
        .cluster(cluster.id)
        .claim_runs(&[
            Claim {
                scheduled_at: fire + second * 4,
                ..claim.clone()
            },
            Claim {
                scheduled_at: fire + second * 5,
                ..claim.clone()
            },
        ])
        .await
        .unwrap();
    let due = ahead[0].as_ref().unwrap().id;
    let not_due = ahead[1].as_ref().unwrap().id;
    catalogue
        .cluster(cluster.id)
        .ingest_reports(&[Report::Abandon {
            run: due,
            reason: "overlap: the previous run is still going".into(),
        }])
        .await
        .unwrap();
    let skipped_ahead = handle.run(due).await.unwrap();
    assert_eq!(skipped_ahead.status, RunStatus::Skipped);
    assert!(skipped_ahead.error.unwrap().starts_with("overlap"));
    handle
        .update_task(task.id, |edit| {
            edit.spec.command = "echo again".into();
            Ok(())
        })
        .await
        .unwrap();
    catalogue
        .cluster(cluster.id)
        .ingest_reports(&[Report::Abandon {
            run: not_due,
            reason: "not started: the task changed before its fire time".into(),
        }])
        .await
        .unwrap();
    assert!(matches!(
        handle.run(not_due).await,
        Err(cloudtask_core::Error::NotFound(_))
    ));
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
    assert_eq!(runs.items.len(), 4);
    let first = runs.items.iter().find(|r| r.id == run.id).unwrap();
    assert_eq!(first.status, RunStatus::Succeeded);
    let queued = handle.queue_run(task.id).await.unwrap();
    assert_eq!(queued.status, RunStatus::Queued);
    let pending = catalogue.pending_commands(cluster.id).await.unwrap();
    assert_eq!(pending.queued.len(), 1);
    assert!(pending.manual_tasks.contains(&task.id));
    let stopped = handle.request_stop(queued.id).await.unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert_eq!(
        stopped.reason,
        Some(cloudtask_core::run::RunReason::UserStop)
    );
    assert!(matches!(
        handle.delete_cluster(cluster.id).await,
        Err(cloudtask_core::Error::Conflict(_))
    ));
    // A run's lines go with it when its task is deleted.
    assert_eq!(log_lines(&catalogue).await, 2);
    handle.delete_task(task.id).await.unwrap();
    assert_eq!(log_lines(&catalogue).await, 0, "lines outlived their runs");
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

/// Log lines stored, of any run.
async fn log_lines(catalogue: &Catalogue) -> i64 {
    use sea_orm::{ConnectionTrait, Statement};
    let db = catalogue.connection();
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM run_log_lines",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}
