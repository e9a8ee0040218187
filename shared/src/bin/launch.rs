//! Starts a data-parallel group of processes on this machine:
//!
//! ```text
//! cargo run --release -p shared --bin launch -- --world 2 -- target/release/examples/ladder --quick
//! ```
//!
//! Each of the `--world` copies of the program gets `MODULE08_RANK`, `MODULE08_WORLD` and
//! `MODULE08_RENDEZVOUS` (a free local port, or `--rendezvous ADDRESS:PORT`); a program that
//! trains in a group joins it with `shared::process_group::TcpGroup::from_env`. Exits non-zero,
//! naming the ranks, when any rank fails.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Start a data-parallel group of processes (one rank each)")]
struct Args {
    /// How many processes (ranks).
    #[arg(long)]
    world: usize,
    /// Where rank 0 listens (default: a free port on 127.0.0.1).
    #[arg(long)]
    rendezvous: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("launch: name the program to start after --"))?;
    let address = match args.rendezvous {
        Some(a) => a,
        None => shared::process_group::free_local_address()?,
    };
    println!(
        "== launch: {} ranks of {program}, rendezvous {address}",
        args.world
    );
    shared::process_group::launch(
        args.world,
        &address,
        std::path::Path::new(program),
        rest,
        &[],
    )?;
    println!("== launch: every rank finished");
    Ok(())
}
