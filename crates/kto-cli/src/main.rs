//! `kto`: KTO training with LoRA, the way TRL's KTOTrainer does it, on candle.
mod commands;
mod cpu_threads;
mod plot;
mod progress;
mod world;

use clap::{Parser, Subcommand};

/// "0.1.0 (cpu only)" or "0.1.0 (cuda: PTX compute_80, CUDA 13.0)": which build this binary is, so that a GPU
/// check proves first that it runs the cuda build.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{} ({})", env!("CARGO_PKG_VERSION"), kto_kernels::BUILD));

#[derive(Parser)]
#[command(
    name = "kto",
    version = VERSION.as_str(),
    about = "KTO (Kahneman-Tversky Optimization) training with LoRA adapters",
    after_help = EXAMPLES
)]
struct Cli {
    /// Only warnings and errors: no progress bars or info logs (results still go to stdout).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Prepare(commands::prepare::PrepareArgs),
    Train(commands::train::TrainArgs),
    Eval(commands::eval::EvalArgs),
    Plot(commands::plot::PlotArgs),
    Generate(commands::generate::GenerateArgs),
    Chat(commands::chat::ChatArgs),
    Export(commands::export::ExportArgs),
    Convert(commands::convert::ConvertArgs),
    Tokenize(commands::tokenize::TokenizeArgs),
}

const EXAMPLES: &str = "\
Examples:
  # train the embedded tiny Llama on the bundled HH sample (2 CPU cores, under 2 minutes)
  kto train --config configs/tiny.toml
  # its learning curves, a reply from the trained adapter, and a merged HF checkpoint
  kto plot runs/tiny
  kto generate --config configs/tiny.toml --prompt $'\\n\\nHuman: Any tips for tea?\\n\\nAssistant:'
  kto export --config configs/tiny.toml --out runs/tiny/merged

Each command has its own examples: kto help train, kto train --help.";

fn main() -> std::process::ExitCode {
    cpu_threads::share_cores();
    let cli = Cli::parse();
    let progress = progress::init(cli.quiet);
    let result = match cli.command {
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Train(args) => commands::train::run(args, progress),
        Command::Eval(args) => commands::eval::run(args, progress),
        Command::Plot(args) => commands::plot::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
