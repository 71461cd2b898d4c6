//! `cloudtask`: one binary, one subcommand per role. Wiring only; each role lives in its crate.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cloudtask_catalogue::{Catalogue, NewUser};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_core::config::Config;
use tokio_util::sync::CancellationToken;

mod config;
mod standalone;

/// glibc's malloc, told to give large blocks back: by default it raises its mmap
/// threshold each time a large block is freed (up to 32 MiB), so after a burst of large
/// allocations (argon2's 19 MiB per check, big answers) it kept them in its heaps and a
/// process stayed hundreds of MiB above its idle size (`cargo bench --bench hostile`).
/// Fixed thresholds put every block over 128 KiB in a mapping of its own, returned when
/// freed, and trim the heap's top past 128 KiB free; a thread asks for the free pages
/// inside the heaps back every 10 s. Measured: 30 s after the hostile bench's attacks
/// the API is 7 MiB above idle (mimalloc, used before: 57–60 MiB), and a worker holding
/// 10,000 tasks takes 48 MB (mimalloc committed whole arenas at once, which with
/// transparent huge pages came back as 72–80 MB resident).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: called first thing in main, before any other thread exists; mallopt only
    // sets integers of the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
    // Free pages inside the heaps (not at their top) go back only when asked: every 10 s.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(10));
                #[allow(unsafe_code)]
                // SAFETY: malloc_trim is thread safe (it locks each arena in turn).
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        })
        .expect("a thread");
}

#[derive(Parser)]
#[command(name = "cloudtask", version, about = "Multi-tenant distributed cron")]
struct Cli {
    /// TOML configuration file; `CLOUDTASK_*` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process, on SQLite under the data folder: nothing to install.
    Standalone,
    /// Serve the GraphQL API.
    Api,
    /// Run a scheduler replica: one leader (elected in ZooKeeper) mirrors and allocates.
    Scheduler,
    /// Join a cluster (CLOUDTASK_CLUSTER_TOKEN) and run its tasks as they are assigned.
    Worker,
    /// Apply catalogue migrations (a no-op when up to date).
    Migrate,
    /// Bootstrap and maintenance.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Print the GraphQL schema (SDL).
    ExportSchema,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user; the password is read from standard input.
    CreateUser {
        #[arg(long)]
        email: String,
        /// Read the password from stdin (the only way: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// May create tenants.
        #[arg(long)]
        platform_admin: bool,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Command::ExportSchema = cli.command {
        print!("{}", cloudtask_api::sdl());
        return ExitCode::SUCCESS;
    }
    let loaded = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("cloudtask: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&loaded.config);
    // Secrets in this process's memory and environment (the admin password, the JWT
    // secret, credentials) stay closed to /proc readers of the same user, tasks included.
    cloudtask_worker::private::seal_process();
    for name in &loaded.unknown_env {
        tracing::warn!(variable = %name, "unknown configuration variable ignored");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(run(cli.command, loaded.config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::ExportSchema => unreachable!("handled before the runtime starts"),
        Command::Migrate => {
            let catalogue = Catalogue::connect(&config.database_url).await?;
            catalogue.migrate().await?;
            tracing::info!("catalogue is up to date");
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::CreateUser {
                    email,
                    password_stdin: _,
                    platform_admin,
                },
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            cloudtask_api::auth::validate_password("password", &password, &email)?;
            let password_hash = cloudtask_api::auth::hash_password(&password)?;
            let catalogue = Catalogue::connect(&config.database_url).await?;
            let user = catalogue
                .create_user(NewUser {
                    email,
                    password_hash,
                    platform_admin,
                })
                .await?;
            println!("{}", user.id);
            Ok(())
        }
        Command::Scheduler => {
            let catalogue = Catalogue::connect(&config.database_url)
                .await?
                .with_queue_expiry(std::time::Duration::from_secs(config.queue_expiry_secs));
            let coordinator = Arc::new(ZkCoordinator::from_config(&config)?);
            let notifier = cloudtask_scheduler::notify::Notifier::new(catalogue.clone(), &config)?;
            let scheduler = cloudtask_scheduler::Scheduler {
                catalogue,
                coordinator,
                identity: format!("{}/{}", hostname(), std::process::id()),
                sweep: cloudtask_scheduler::SWEEP,
                writes: Arc::default(),
                notifier: Some(notifier),
                pruning: cloudtask_scheduler::retention::Pruning::from_config(&config),
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            tracing::info!("scheduler started");
            scheduler.run(shutdown).await
        }
        Command::Standalone => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            standalone::run(config, shutdown).await
        }
        Command::Worker => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            cloudtask_worker::run(&config, shutdown).await
        }
        Command::Api => {
            let catalogue = Catalogue::connect(&config.database_url).await?;
            let listen = config.listen;
            let state = cloudtask_api::AppState::new(catalogue, config)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(address = %listener.local_addr()?, "API listening; GraphiQL at /graphql");
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            cloudtask_api::run(state, listener, shutdown).await?;
            Ok(())
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Ctrl-C or SIGTERM cancels the one shutdown token.
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
