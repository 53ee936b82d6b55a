//! `kto`: KTO training with LoRA, the way TRL's KTOTrainer does it, on candle.
mod commands;
mod plot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kto", version, about = "KTO (Kahneman-Tversky Optimization) training with LoRA adapters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Prepare(commands::prepare::PrepareArgs),
    Train(commands::train::TrainArgs),
    Eval(commands::eval::EvalArgs),
    Plot(commands::plot::PlotArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Plot(args) => commands::plot::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
