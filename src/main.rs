//! The `sluice` binary: parse the settings, start logging and metrics, run
//! the service until SIGTERM or SIGINT, drain, and exit.

use std::process::ExitCode;

use anyhow::Context as _;

use sluice::config::{Cli, Command};
use sluice::startup::Application;
use sluice::telemetry;

fn main() -> ExitCode {
    let cli = Cli::load().unwrap_or_else(|err| err.exit());
    // lapin logs a refused passive declare (a missing queue) as an error of
    // its own: the dead-letter commands say it once, in their own words.
    let filter = match &cli.command {
        Some(Command::DeadLetters(_)) if !cli.service.log_filter.contains("lapin") => {
            format!("{},lapin=off", cli.service.log_filter)
        }
        _ => cli.service.log_filter.clone(),
    };
    telemetry::init_logging(&filter, &cli.service.instance());
    let result = match cli.command {
        None | Some(Command::Serve) => actix_web::rt::System::new().block_on(serve(cli.service)),
        Some(Command::Load(args)) => load(&cli.service, &args),
        Some(Command::DeadLetters(args)) => dead_letters(&cli.service, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: sluice::config::Config) -> anyhow::Result<()> {
    let instance = config.instance();
    log::info!("instance {instance}");
    let metrics = telemetry::install_metrics(&instance)?;
    let app = Application::build(config, metrics).await?;
    app.run_until(shutdown_signal()).await
}

/// `sluice load`: publish test events on a single-threaded runtime.
fn load(config: &sluice::config::Config, args: &sluice::load::LoadArgs) -> anyhow::Result<()> {
    let tls = config.broker_tls()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(sluice::load::run(
        &config.amqp_url,
        &tls,
        &config.amqp_prefix,
        args,
    ))?;
    Ok(())
}

/// `sluice dead-letters …` on a single-threaded runtime.
fn dead_letters(
    config: &sluice::config::Config,
    args: &sluice::dead_letters::cli::DeadLettersArgs,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(sluice::dead_letters::cli::run(config, args))
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot install signal handlers; stop the service with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
}
