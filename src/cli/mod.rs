//! Command-line interface: argument parsing and dispatch. `serve` runs the daemon
//! ([`serve`]); the other commands talk to a running daemon over its control socket
//! ([`admin`]) or check a cache object offline.

pub mod admin;
pub mod error;
pub mod log_limit;
pub mod serve;
pub mod units;

pub use error::CliError;
pub use units::parse_size;

use clap::{Parser, Subcommand};
use serve::ServeArgs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "snapblk",
    version,
    about = "Serve VM disks over vhost-user-blk from an origin image",
    long_about = "snapblk serves a raw origin image to virtual machines over the vhost-user-blk \
protocol (QEMU's vhost-user-blk-pci, cloud-hypervisor's --disk vhost_user=true).\n\n\
Quick start:\n  snapblk serve                      # serves ./snapblk-data/origin.img (8 GiB, sparse)\n  \
snapblk serve --origin disk.img --socket /tmp/disk.sock --num-queues 4\n\n\
Set RUST_LOG=debug for request-level logging."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the origin image on a vhost-user-blk socket until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Create, list, delete, restore and serve snapshots of a running daemon.
    Snapshot {
        #[command(flatten)]
        control: admin::ControlArg,
        #[command(subcommand)]
        command: admin::SnapshotCommand,
    },
    /// Verify a cache object offline (the daemon must not be running on it). Exit status 0
    /// when clean, 1 when damage was found, 2 when it cannot be read at all.
    Check {
        /// The cache object file.
        cache: PathBuf,
    },
    /// I/O, copy-on-write and cache-space counters of a running daemon.
    Stats {
        #[command(flatten)]
        control: admin::ControlArg,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every call site's lines are rate-limited (see `log_limit`): a hostile frontend that
    // makes us or a library log on each of its requests cannot fill the disk.
    log_limit::install(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format_timestamp_millis()
            .build(),
    );
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Snapshot { control, command } => admin::snapshot(&control.control, command),
        Command::Stats { control, json } => admin::stats(&control.control, json),
        Command::Check { cache } => return check(&cache),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapblk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match crate::cow::check::check_cache_path(path) {
        Ok(report) => {
            println!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("snapblk: error: cannot check {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
