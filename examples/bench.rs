//! Stand-alone entry point for `arbiter bench` (same code), handy on machines that only need
//! the benchmark: `cargo run --release --example bench -- train --shape smollm2-135m --random-init`.
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: arbiter::bench::BenchCommand,
}

fn main() -> anyhow::Result<()> {
    arbiter::bench::bench(&Cli::parse().cmd)
}
