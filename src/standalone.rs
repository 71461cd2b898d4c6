//! `cloudtask standalone`: the API, the scheduler and one worker in one process, on an
//! embedded SQLite database under the data folder and the in-memory coordinator. Nothing
//! to install. The first start creates the platform admin, tenant `default` and cluster
//! `local`; a restart keeps everything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloudtask_api::auth::{hash_password, random_token, token_hash};
use cloudtask_catalogue::{Catalogue, NewUser, Scope};
use cloudtask_coord::Coordinator;
use cloudtask_coord::memory::MemoryCoordinator;
use cloudtask_core::config::Config;
use tokio_util::sync::CancellationToken;

const TENANT: &str = "default";
const CLUSTER: &str = "local";
/// Without LISTEN/NOTIFY (SQLite), the scheduler reconciles this often.
const SWEEP: Duration = Duration::from_secs(1);

pub async fn run(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    private_catalogue(&data_dir)?;
    config.database_url = format!(
        "sqlite:{}?mode=rwc",
        data_dir.join("cloudtask.db").display()
    );
    if config.jwt_secret.is_none() {
        config.jwt_secret = Some(jwt_secret(&data_dir)?);
    }

    let catalogue = Catalogue::connect(&config.database_url)
        .await?
        .with_queue_expiry(std::time::Duration::from_secs(config.queue_expiry_secs));
    catalogue.migrate().await?;
    let bootstrap = bootstrap(&catalogue, &config).await?;

    // The in-process tree has ACLs like ZooKeeper's: the API and scheduler own it, the
    // worker reaches it with the identity it is handed at join.
    let owner = cloudtask_coord::Access::owner(cloudtask_coord::Credential::generate("cloudtask"));
    let coordinator: Arc<dyn Coordinator> = Arc::new(MemoryCoordinator::new().as_access(owner));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let url = format!("http://{address}");

    let api_stop = CancellationToken::new();
    let state = cloudtask_api::AppState::with_coordinator(
        catalogue.clone(),
        config.clone(),
        coordinator.clone(),
    )?;
    let api = tokio::spawn(cloudtask_api::run(state, listener, api_stop.clone()));

    let scheduler_stop = CancellationToken::new();
    let scheduler = cloudtask_scheduler::Scheduler {
        catalogue: catalogue.clone(),
        coordinator: coordinator.clone(),
        identity: "standalone".into(),
        sweep: SWEEP,
        writes: Arc::default(),
        notifier: Some(cloudtask_scheduler::notify::Notifier::new(
            catalogue.clone(),
            &config,
        )?),
        pruning: cloudtask_scheduler::retention::Pruning::from_config(&config),
    };
    let scheduler = tokio::spawn(scheduler.run(scheduler_stop.clone()));

    let worker_config = worker_config(&config, &url, &bootstrap);
    let worker_stop = CancellationToken::new();
    let worker = {
        let stop = worker_stop.clone();
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            cloudtask_worker::run_on(
                &worker_config,
                coordinator,
                Arc::new(cloudtask_worker::clock::SystemClock),
                stop,
            )
            .await
        })
    };

    print_banner(&config, &url, &bootstrap);
    tracing::info!(%address, "standalone ready");

    shutdown.cancelled().await;
    // The worker first: its runs are stopped and reported while the API still listens.
    worker_stop.cancel();
    match worker.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the worker stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "the worker task failed"),
        Ok(Ok(())) => {}
    }
    scheduler_stop.cancel();
    let _ = scheduler.await;
    api_stop.cancel();
    let _ = api.await;
    Ok(())
}

/// The data folder and the catalogue's files, the server's user's alone (the catalogue
/// made 0600 before SQLite opens it: its -wal and -shm files take the same mode).
fn private_catalogue(data_dir: &Path) -> anyhow::Result<()> {
    use cloudtask_worker::private::{private_dir, private_file, write_private};
    private_dir(data_dir).context("the data folder")?;
    let catalogue = data_dir.join("cloudtask.db");
    if !catalogue.exists() {
        write_private(&catalogue, b"")?;
    }
    for file in [
        "cloudtask.db",
        "cloudtask.db-wal",
        "cloudtask.db-shm",
        "jwt-secret",
    ] {
        private_file(&data_dir.join(file))?;
    }
    Ok(())
}

/// The one worker's configuration: this API, the local cluster's token, its own folder
/// (its runs' folder where the whole server's configuration puts it: never inside).
fn worker_config(config: &Config, url: &str, bootstrap: &Bootstrap) -> Config {
    let mut worker = config.clone();
    worker.api_url = url.to_owned();
    worker.cluster_token = Some(bootstrap.join_token.clone());
    worker.run_dir = Some(config.run_dir());
    worker.data_dir = config.data_dir.join("worker");
    if worker.worker_name.is_none() {
        worker.worker_name = Some("local-worker".into());
    }
    worker
}

/// Where to go, and who signs in (a generated password is shown this once).
fn print_banner(config: &Config, url: &str, bootstrap: &Bootstrap) {
    println!(
        "CloudTask standalone is running (data in {}).",
        config.data_dir.display()
    );
    println!("  console: {url}/");
    println!("  GraphQL API and GraphiQL: {url}/graphql");
    println!("  tenant \"{TENANT}\", cluster \"{CLUSTER}\" with one worker");
    match (&bootstrap.new_password, bootstrap.created) {
        (Some(password), _) => println!(
            "  platform admin: {} / {password}   (shown this once)",
            config.admin_email
        ),
        (None, true) => println!(
            "  platform admin: {} (password from CLOUDTASK_ADMIN_PASSWORD)",
            config.admin_email
        ),
        (None, false) => println!(
            "  platform admin: {} (password as set on the first start)",
            config.admin_email
        ),
    }
}

struct Bootstrap {
    join_token: String,
    /// The admin was created on this start.
    created: bool,
    /// The admin's password when it was generated now (printed once).
    new_password: Option<String>,
}

/// The admin, tenant `default` and cluster `local`, created on the first start; the
/// cluster's join token is new on every start (only its hash is stored).
async fn bootstrap(catalogue: &Catalogue, config: &Config) -> anyhow::Result<Bootstrap> {
    let mut new_password = None;
    let mut created = false;
    let admin = match catalogue.user_credentials(&config.admin_email).await? {
        Some(existing) => existing.user,
        None => {
            created = true;
            let password = match &config.admin_password {
                Some(password) => password.clone(),
                None => {
                    let generated = random_token("");
                    new_password = Some(generated.clone());
                    generated
                }
            };
            cloudtask_api::auth::validate_password(
                "admin_password",
                &password,
                &config.admin_email,
            )
            .map_err(|e| match e {
                cloudtask_core::Error::BadInput { message, .. } => anyhow::anyhow!(
                    "the admin password (CLOUDTASK_ADMIN_PASSWORD, `admin_password`) {message}"
                ),
                other => other.into(),
            })?;
            catalogue
                .create_user(NewUser {
                    email: config.admin_email.clone(),
                    password_hash: hash_password(&password)?,
                    platform_admin: true,
                })
                .await?
        }
    };
    let actor = admin.id.to_string();
    let tenant = match catalogue
        .tenants()
        .await?
        .into_iter()
        .find(|t| t.name == TENANT)
    {
        Some(tenant) => tenant,
        None => {
            catalogue
                .create_tenant((admin.id, &actor), TENANT, &config.admin_email, None)
                .await?
        }
    };
    let handle = catalogue
        .tenant(Scope {
            tenant_id: tenant.id,
            user_id: admin.id,
            actor: "standalone".into(),
        })
        .await?;
    let join_token = random_token("ctj_");
    match handle
        .clusters()
        .await?
        .into_iter()
        .find(|c| c.name == CLUSTER)
    {
        Some(cluster) => {
            handle
                .rotate_cluster_token(cluster.id, token_hash(&join_token))
                .await?;
        }
        None => {
            handle
                .create_cluster(CLUSTER, token_hash(&join_token))
                .await?;
        }
    }
    Ok(Bootstrap {
        join_token,
        created,
        new_password,
    })
}

/// The access-token secret, generated on the first start and kept in the data folder so
/// tokens survive a restart.
fn jwt_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => Ok(secret.trim().to_owned()),
        _ => {
            let secret = random_token("");
            cloudtask_worker::private::write_private(&path, secret.as_bytes())?;
            Ok(secret)
        }
    }
}
