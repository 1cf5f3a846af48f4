use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = arbiter::config::Settings::parse();
    arbiter::init_tracing();
    match arbiter::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "arbiter stopped with an error");
            ExitCode::FAILURE
        }
    }
}
