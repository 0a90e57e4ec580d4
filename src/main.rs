//! The `sluice` binary: parse the settings, start logging and metrics, run
//! the service until SIGTERM or SIGINT, drain, and exit.

use std::process::ExitCode;

use anyhow::Context as _;

use sluice::config::{Cli, Command};
use sluice::startup::Application;
use sluice::telemetry;

fn main() -> ExitCode {
    let cli = Cli::load().unwrap_or_else(|err| err.exit());
    telemetry::init_logging(&cli.service.log_filter, &cli.service.instance());
    let result = match cli.command {
        None | Some(Command::Serve) => actix_web::rt::System::new().block_on(serve(cli.service)),
        Some(Command::Load(args)) => load(&cli.service, &args),
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
