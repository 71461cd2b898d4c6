//! The catalogue is portable: the same migrations and tenant-scoped code run on SQLite
//! (the standalone mode's database). The Postgres side is covered by the API suite.

use cloudtask_catalogue::{Catalogue, NewTask, NewUser, PageRequest, Scope, TaskFilter};
use cloudtask_core::roles::Role;
use cloudtask_core::task::{TaskSpec, TaskState};

#[tokio::test]
async fn migrations_and_tenant_handle_work_on_sqlite() {
    let catalogue = Catalogue::connect("sqlite::memory:").await.unwrap();
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
