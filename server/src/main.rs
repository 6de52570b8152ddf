//! `switchyard`: the coordinator's command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use switchyard::{Config, Mode, Strategy};
use switchyard_server::app::{serve, App, Settings};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchyard: hands tagged, prioritised tasks to workers that fetch them over HTTP.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the coordinator on the embedded SQLite store in a data directory.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SWITCHYARD_BIND", default_value = "127.0.0.1:7878")]
    bind: String,
    /// Directory of the embedded store (created if missing).
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "switchyard-data")]
    data_dir: PathBuf,
    /// Placement: every candidate holds a task (fanout), or one does (a balanced strategy).
    #[arg(long, env = "SWITCHYARD_MODE", value_enum, default_value_t = ModeArg::Fanout)]
    mode: ModeArg,
    /// Priority units a waiting task gains per second (0: strict priority).
    #[arg(long, env = "SWITCHYARD_AGING_RATE", default_value_t = 0.0)]
    aging_rate: f64,
    /// Weight of a running task in a worker's load (balanced modes).
    #[arg(long, env = "SWITCHYARD_RUNNING_WEIGHT", default_value_t = 1.0)]
    running_weight: f64,
    /// Most tasks one fetch may return.
    #[arg(long, env = "SWITCHYARD_MAX_FETCH", default_value_t = 256)]
    max_fetch: usize,
    /// Largest task payload, in bytes of JSON.
    #[arg(long, env = "SWITCHYARD_MAX_PAYLOAD", default_value_t = 1 << 20)]
    max_payload: usize,
    /// Seconds of silence after which a worker is declared dead and its tasks redistributed.
    #[arg(long, env = "SWITCHYARD_LEASE_TIMEOUT", default_value_t = 15.0)]
    lease_timeout: f64,
    /// Most tasks in one batch submission.
    #[arg(long, env = "SWITCHYARD_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_BODY", default_value_t = 16 << 20)]
    max_body: usize,
    /// Longest a fetch may wait for work (long-poll), in seconds.
    #[arg(long, env = "SWITCHYARD_MAX_WAIT", default_value_t = 30.0)]
    max_wait: f64,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let stderr = std::io::stderr();
    tracing_subscriber::fmt()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&stderr))
        .init();
    let Command::Serve(args) = Cli::parse().command;
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = Config {
        mode: args.mode.into(),
        aging_rate: args.aging_rate,
        running_weight: args.running_weight,
        ..Config::default()
    };
    if !(args.lease_timeout.is_finite() && args.lease_timeout > 0.0) {
        return Err("--lease-timeout must be a positive number of seconds".into());
    }
    if !(args.max_wait.is_finite() && args.max_wait >= 0.0) {
        return Err("--max-wait must be a number of seconds, 0 or more".into());
    }
    let limits = Settings {
        max_fetch: args.max_fetch,
        max_payload: args.max_payload,
        lease_timeout: std::time::Duration::from_secs_f64(args.lease_timeout),
        max_batch: args.max_batch,
        max_body: args.max_body,
        max_wait: std::time::Duration::from_secs_f64(args.max_wait),
    };
    let (app, writer_task) = App::open(&args.data_dir, config, limits).await?;
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .map_err(|e| format!("binding {}: {e}", args.bind))?;
    serve(listener, app.clone(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    // Drain the writer: drop the last handles, then wait for it to commit what is queued.
    drop(app);
    writer_task.await?;
    Ok(())
}
