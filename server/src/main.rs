//! `switchyard`: the coordinator (`serve`) and a client of it (every other subcommand).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};
use switchyard::{Config, Limits, Mode, Strategy};
use switchyard_server::api::serve;
use switchyard_server::app::{App, Opened, Settings};
use switchyard_server::client::Client;
use switchyard_server::work::{work, WorkOptions};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchyard: hands tagged, prioritised tasks to workers that fetch them over HTTP.
///
/// `serve` runs the coordinator; the other subcommands talk to one.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log level on stderr: error, warn, info or debug (debug logs every request).
    #[arg(long, global = true, env = "SWITCHYARD_LOG", default_value = "info")]
    log: tracing::level_filters::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the coordinator on the embedded SQLite store in a data directory.
    Serve(Box<ServeArgs>),
    /// Submits a task; prints its id.
    Submit {
        #[command(flatten)]
        conn: Connection,
        /// The task's group.
        #[arg(long)]
        group: String,
        /// A tag the worker must hold (repeat for several).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// The payload, as JSON (a bare word is taken as a string).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Shows a task: state, attempt, worker, outcome.
    Status {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        task: u64,
    },
    /// Cancels a queued or running task.
    Cancel {
        #[command(flatten)]
        conn: Connection,
        /// The task's id.
        task: u64,
    },
    /// Shows totals, counters and every worker's load (admin).
    Stats {
        #[command(flatten)]
        conn: Connection,
    },
    /// Moves queued tasks from overloaded to underloaded workers now (admin).
    Rebalance {
        #[command(flatten)]
        conn: Connection,
    },
    /// Manages submitter tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Runs a worker that executes a shell command per task (see `--help`).
    ///
    /// Each task runs as `sh -c COMMAND`, with the payload's JSON on stdin and (up to 64 KiB) in
    /// SWITCHYARD_PAYLOAD, and SWITCHYARD_TASK_ID, SWITCHYARD_ATTEMPT, SWITCHYARD_PRIORITY set.
    /// Exit status 0 reports the task finished with stdout as its result; anything else reports
    /// it failed. If the coordinator is unreachable it retries; Ctrl-C gives back the task in
    /// hand and leaves.
    Work(WorkArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a submitter token for some groups; prints it (it is shown only once).
    Create {
        #[command(flatten)]
        conn: Connection,
        /// A group the token may use (repeat for several).
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
    },
    /// Lists the tokens in force (ids, roles, groups; never the tokens).
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Revokes a submitter token.
    Revoke {
        #[command(flatten)]
        conn: Connection,
        /// The token's id.
        id: u64,
    },
}

/// Where the coordinator is, and the token to present.
#[derive(Args)]
struct Connection {
    /// The coordinator's address. Coordinators sharing a database (`serve --shared`) may be
    /// listed comma-separated: `work` registers through any that answers; other commands use
    /// the first (a request for another's groups is sent on to it).
    #[arg(
        long,
        env = "SWITCHYARD_SERVER",
        default_value = "http://127.0.0.1:7878"
    )]
    server: String,
    /// A bearer token (admin or submitter).
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Connection {
    fn client(&self) -> Result<Client, Error> {
        let first = self.server.split(',').next().unwrap_or_default().trim();
        Ok(Client::new(first, self.token.clone())?)
    }
}

#[derive(Args)]
struct WorkArgs {
    #[command(flatten)]
    conn: Connection,
    /// A group served (repeat for several).
    #[arg(long = "group", required = true)]
    groups: Vec<String>,
    /// A tag held (repeat for several).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Tasks taken per fetch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds a fetch waits for work.
    #[arg(long, default_value_t = 20.0)]
    wait: f64,
    /// Stop after this many tasks.
    #[arg(long)]
    tasks: Option<u64>,
    /// The shell command to run per task.
    #[arg(long)]
    command: String,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SWITCHYARD_BIND", default_value = "127.0.0.1:7878")]
    bind: String,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "switchyard-data")]
    data_dir: PathBuf,
    /// Store in PostgreSQL instead (`postgres://user@host:port/database`); the data
    /// directory is then not used.
    #[arg(long, env = "SWITCHYARD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The admin token. Without it, the stored one is kept, or one is generated and printed on
    /// the first start. Giving it replaces any earlier admin token.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Placement: every candidate holds a task (fanout), or one does (a balanced strategy).
    #[arg(long, env = "SWITCHYARD_MODE", value_enum, default_value_t = ModeArg::Fanout)]
    mode: ModeArg,
    /// Priority units a waiting task gains per second (0: strict priority).
    #[arg(long, env = "SWITCHYARD_AGING_RATE", default_value_t = 0.0)]
    aging_rate: f64,
    /// `rebalance` stops moving work off a worker once its load is at most this multiple of
    /// the least-loaded candidate's (balanced modes; at least 1).
    #[arg(long, env = "SWITCHYARD_REBALANCE_RATIO", default_value_t = 1.5)]
    rebalance_ratio: f64,
    /// Shards of the dispatcher's concurrent maps (1 to 65536; more spreads contention).
    #[arg(long, env = "SWITCHYARD_SHARDS", default_value_t = 64)]
    shards: usize,
    /// Weight of a running task in a worker's load (balanced modes).
    #[arg(long, env = "SWITCHYARD_RUNNING_WEIGHT", default_value_t = 1.0)]
    running_weight: f64,
    /// On PostgreSQL: seconds a coordinator's hold on its groups lasts without renewal (it
    /// renews five times per lease; after a crash, a restart waits this long for the old hold
    /// to lapse).
    #[arg(long, env = "SWITCHYARD_GROUP_LEASE", default_value_t = 2.5)]
    group_lease: f64,
    /// On PostgreSQL: if another coordinator serves the database, wait until its group leases
    /// lapse (it stops or dies) and then serve, instead of refusing to start; it also retries
    /// until the database answers.
    #[arg(long, env = "SWITCHYARD_STANDBY", conflicts_with = "shared")]
    standby: bool,
    /// On PostgreSQL: serve a share of the groups alongside the database's other coordinators
    /// (each started with --shared); requests for another coordinator's groups are answered
    /// 421 with its address, and a dead coordinator's groups are taken over within the lease.
    #[arg(long, env = "SWITCHYARD_SHARED", requires = "database_url")]
    shared: bool,
    /// The address other coordinators' clients are sent to for this one's groups (with
    /// --shared; default: the address it listens on).
    #[arg(long, env = "SWITCHYARD_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Seconds of silence after which a worker is declared dead and its tasks redistributed.
    #[arg(long, env = "SWITCHYARD_LEASE_TIMEOUT", default_value_t = 15.0)]
    lease_timeout: f64,
    /// Most tasks one fetch may return.
    #[arg(long, env = "SWITCHYARD_MAX_FETCH", default_value_t = 256)]
    max_fetch: usize,
    /// Longest a fetch may wait for work (long-poll), in seconds.
    #[arg(long, env = "SWITCHYARD_MAX_WAIT", default_value_t = 30.0)]
    max_wait: f64,
    /// Longest a request may take, in seconds (must exceed --max-wait).
    #[arg(long, env = "SWITCHYARD_REQUEST_TIMEOUT", default_value_t = 60.0)]
    request_timeout: f64,
    /// Largest task payload, in bytes of JSON.
    #[arg(long, env = "SWITCHYARD_MAX_PAYLOAD", default_value_t = 1 << 20)]
    max_payload: usize,
    /// Most tasks in one batch submission.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_BODY", default_value_t = 16 << 20)]
    max_body: usize,
    /// Most tags on one task or worker.
    #[arg(long, env = "SWITCHYARD_MAX_TAGS", default_value_t = 32)]
    max_tags: usize,
    /// Most groups one worker serves.
    #[arg(long, env = "SWITCHYARD_MAX_GROUPS", default_value_t = 32)]
    max_groups: usize,
    /// Longest group or tag name, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_NAME_LEN", default_value_t = 128)]
    max_name_len: usize,
    /// Most task classes (distinct group and tag set pairs); a task of a new class beyond it
    /// is refused. Classes are kept until the coordinator stops.
    #[arg(long, env = "SWITCHYARD_MAX_CLASSES", default_value_t = 65_536)]
    max_classes: usize,
    /// Seconds a submission's idempotency key is remembered (a retry within it creates nothing).
    #[arg(
        long,
        env = "SWITCHYARD_IDEMPOTENCY_WINDOW",
        default_value_t = 86_400.0
    )]
    idempotency_window: f64,
    /// Seconds a connection has to send a request's complete head, after connecting or after
    /// the previous response (bounds half-sent headers and idle keep-alive connections); also
    /// how long a response write may make no progress (a client that stopped reading).
    #[arg(long, env = "SWITCHYARD_HEADER_TIMEOUT", default_value_t = 10.0)]
    header_timeout: f64,
    /// Most connections served at once; more are answered 503 and closed. Lowered to fit the
    /// open-files limit, whose soft value is raised to the hard one at start.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Seconds open connections get to finish on shutdown before they are dropped.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE", default_value_t = 5.0)]
    shutdown_grace: f64,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Fanout,
    LeastLoaded,
    RoundRobin,
    PowerOfTwo,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Fanout => Mode::Fanout,
            ModeArg::LeastLoaded => Mode::Balanced(Strategy::LeastLoaded),
            ModeArg::RoundRobin => Mode::Balanced(Strategy::RoundRobin),
            ModeArg::PowerOfTwo => Mode::Balanced(Strategy::PowerOfTwoChoices),
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let stderr = std::io::stderr();
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&stderr))
        .init();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Serve(args) => serve_command(*args).await,
        Command::Submit {
            conn,
            group,
            tags,
            priority,
            payload,
        } => {
            let payload = match payload {
                None => Value::Null,
                Some(p) => serde_json::from_str(&p).unwrap_or(Value::String(p)),
            };
            let body =
                json!({"group": group, "tags": tags, "priority": priority, "payload": payload});
            let r = conn
                .client()?
                .call(Method::POST, "/v1/tasks", Some(&body))
                .await?;
            println!("{}", r["id"]);
            Ok(())
        }
        Command::Status { conn, task } => {
            let path = format!("/v1/tasks/{task}");
            print(&conn.client()?.call(Method::GET, &path, None).await?);
            Ok(())
        }
        Command::Cancel { conn, task } => {
            let path = format!("/v1/tasks/{task}");
            print(&conn.client()?.call(Method::DELETE, &path, None).await?);
            Ok(())
        }
        Command::Stats { conn } => {
            print(&conn.client()?.call(Method::GET, "/v1/stats", None).await?);
            Ok(())
        }
        Command::Rebalance { conn } => {
            let path = "/v1/admin/rebalance";
            print(&conn.client()?.call(Method::POST, path, None).await?);
            Ok(())
        }
        Command::Token(TokenCommand::Create { conn, groups }) => {
            let body = json!({ "groups": groups });
            let r = conn
                .client()?
                .call(Method::POST, "/v1/admin/tokens", Some(&body))
                .await?;
            eprintln!("token {} for groups {}", r["id"], r["groups"]);
            println!("{}", r["token"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Token(TokenCommand::List { conn }) => {
            print(
                &conn
                    .client()?
                    .call(Method::GET, "/v1/admin/tokens", None)
                    .await?,
            );
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { conn, id }) => {
            let path = format!("/v1/admin/tokens/{id}");
            print(&conn.client()?.call(Method::DELETE, &path, None).await?);
            Ok(())
        }
        Command::Work(args) => {
            if !(args.wait.is_finite() && args.wait >= 0.0) {
                return Err("--wait must be a number of seconds, 0 or more".into());
            }
            let options = WorkOptions {
                groups: args.groups,
                tags: args.tags,
                command: args.command,
                batch: args.batch,
                wait: Duration::from_secs_f64(args.wait),
                tasks: args.tasks,
            };
            let registrars = args
                .conn
                .server
                .split(',')
                .map(|server| Client::new(server.trim(), args.conn.token.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let summary = work(&registrars, &options, stop_signal()).await?;
            eprintln!(
                "switchyard work: {} finished, {} failed, {} reports refused, {} revoked",
                summary.finished, summary.failed, summary.refused, summary.revoked
            );
            Ok(())
        }
    }
}

/// Ctrl-C (SIGINT) or SIGTERM (what service managers and containers send).
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stop signal received");
}

/// A stop signal (Ctrl-C or SIGTERM), listened for once for the life of `serve`: a signal that
/// arrives between two waits (while the writer drains, say) is not lost.
fn stop_requests() -> tokio::sync::watch::Receiver<bool> {
    let (requested, requests) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = requested.send(true);
    });
    requests
}

/// Resolves once a stop has been requested (at once if it already has).
async fn stop_requested(mut requests: tokio::sync::watch::Receiver<bool>) {
    let _ = requests.wait_for(|stop| *stop).await;
}

/// The longest duration any flag takes: a year.
const LONGEST: f64 = 365.0 * 24.0 * 3600.0;

fn seconds(value: f64, flag: &str, allow_zero: bool) -> Result<Duration, Error> {
    if value.is_finite() && value <= LONGEST && (value > 0.0 || (allow_zero && value == 0.0)) {
        Ok(Duration::from_secs_f64(value))
    } else {
        let least = if allow_zero { "0" } else { "above 0" };
        Err(
            format!("{flag} must be a number of seconds, from {least} to {LONGEST} (a year)")
                .into(),
        )
    }
}

async fn serve_command(args: ServeArgs) -> Result<(), Error> {
    if std::env::args().any(|a| a == "--admin-token" || a.starts_with("--admin-token=")) {
        tracing::warn!(
            "--admin-token is visible to every user in the process list: \
             prefer the SWITCHYARD_ADMIN_TOKEN environment variable"
        );
    }
    let config = Config {
        mode: args.mode.into(),
        aging_rate: args.aging_rate,
        rebalance_ratio: args.rebalance_ratio,
        shards: args.shards,
        running_weight: args.running_weight,
        limits: Limits {
            max_tags: args.max_tags,
            max_groups: args.max_groups,
            max_name_len: args.max_name_len,
            max_classes: args.max_classes,
        },
    };
    let mut limits = Settings {
        max_fetch: args.max_fetch,
        max_payload: args.max_payload,
        lease_timeout: seconds(args.lease_timeout, "--lease-timeout", false)?,
        group_lease: seconds(args.group_lease, "--group-lease", false)?,
        standby: args.standby,
        shared: args.shared,
        max_batch: args.max_batch,
        max_body: args.max_body,
        max_wait: seconds(args.max_wait, "--max-wait", true)?,
        request_timeout: seconds(args.request_timeout, "--request-timeout", false)?,
        admin_token: args.admin_token,
        key_window: seconds(args.idempotency_window, "--idempotency-window", false)?,
        header_timeout: seconds(args.header_timeout, "--header-timeout", false)?,
        max_connections: args.max_connections,
        shutdown_grace: seconds(args.shutdown_grace, "--shutdown-grace", true)?,
    };
    let mut listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .map_err(|e| format!("binding {}: {e}", args.bind))?;
    // Other coordinators and clients reach this one at the address it listens on.
    let bound = listener
        .local_addr()
        .map_err(|e| format!("binding {}: {e}", args.bind))?
        .to_string();
    let address = args.advertise.clone().unwrap_or_else(|| bound.clone());
    let stop = stop_requests();
    let mut restarts = 0u64;
    loop {
        let Opened {
            app,
            writer,
            new_admin_token,
        } = match &args.database_url {
            Some(url) => loop {
                let opening = async {
                    match limits.shared {
                        true => {
                            App::open_shared(url, &address, config.clone(), limits.clone()).await
                        }
                        false => {
                            App::open_postgres(url, &address, config.clone(), limits.clone()).await
                        }
                    }
                };
                let opened = tokio::select! {
                    opened = opening => opened,
                    () = stop_requested(stop.clone()) => {
                        // Nothing was served or decided: nothing to drain. (An opening
                        // waiting for leases blocks a thread the runtime would wait for.)
                        std::process::exit(0);
                    }
                };
                match opened {
                    Ok(opened) => break opened,
                    // After a failure the database may still be away: wait until it answers.
                    Err(e) if restarts > 0 || limits.standby => {
                        tracing::warn!(error = %e, "opening the database failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop_requested(stop.clone()) => return Ok(()),
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
            None => App::open(&args.data_dir, config.clone(), limits.clone()).await?,
        };
        if let Some(token) = new_admin_token {
            // Printed once: only its hash is stored.
            eprintln!(
                "\nThe admin token (shown only now; only its hash is stored):\n\n    {token}\n\n\
                 Keep it, for example: export SWITCHYARD_TOKEN={token}\n"
            );
        }
        let stopped = serve(listener, app.clone(), stop_requested(stop.clone())).await?;
        if stopped.dropped > 0 {
            eprintln!(
                "switchyard: {} connections were still open after --shutdown-grace: dropped",
                stopped.dropped
            );
        }
        let poisoned = app.poisoned();
        // Drain the writer: drop the last handles, then wait for it to commit what is queued.
        drop(app);
        writer.await?;
        let Some(reason) = poisoned else {
            return Ok(());
        };
        if args.database_url.is_none() {
            return Err(format!("stopped: {reason}; restart to recover from the store").into());
        }
        if *stop.borrow() {
            // Asked to stop as well: stop, and let the next start recover.
            return Err(format!("stopped: {reason}").into());
        }
        // On PostgreSQL the coordinator recovers by itself, as a restart would: it rebuilds
        // everything from the database once it answers again, after waiting (as a standby)
        // for its groups' leases.
        restarts += 1;
        tracing::error!(%reason, restarts, "stopped serving; recovering from the database");
        limits.standby = !limits.shared;
        listener = loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop_requested(stop.clone()) => return Ok(()),
            }
            match tokio::net::TcpListener::bind(&bound).await {
                Ok(listener) => break listener,
                Err(e) => tracing::warn!(error = %e, %bound, "binding again failed; retrying"),
            }
        };
    }
}
