//! Command-line interface: argument parsing and dispatch. `serve` runs the daemon
//! ([`serve`]); the other commands talk to a running daemon over its control socket
//! ([`admin`]) or check a cache object offline.

pub mod activation;
pub mod admin;
mod disks;
pub mod error;
pub mod log_limit;
pub mod origin;
pub mod output;
pub mod remote;
pub mod resize;
pub mod serve;
pub mod space;
pub mod units;

pub use error::CliError;
pub use units::parse_size;

use clap::{Parser, Subcommand};
use output::{errln, outln};
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
    /// Print the vhost-user backend capabilities (JSON: the device type and the options of
    /// `snapblk serve` it accepts) and exit (vhost-user "backend program conventions").
    #[arg(long)]
    pub print_capabilities: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// Verify a cache object offline (refused while a daemon runs on it). Exit status 0
    /// when clean, 1 when damage was found, 2 when it cannot be checked (unreadable, or in
    /// use).
    Check {
        /// The cache object file.
        cache: PathBuf,
    },
    /// Export a device over NBD (every device is exported read-only by default); with
    /// --writable NBD clients may write it too (a writable device only). Remembered across
    /// restarts.
    Export {
        #[command(flatten)]
        control: admin::ControlArg,
        /// The device: "origin" or a snapshot's name.
        name: String,
        /// Let NBD clients write.
        #[arg(long)]
        writable: bool,
    },
    /// Stop exporting a device over NBD (remembered across restarts).
    Unexport {
        #[command(flatten)]
        control: admin::ControlArg,
        name: String,
        /// Even if NBD clients are connected (their connections end after their current
        /// request).
        #[arg(long)]
        force: bool,
    },
    /// Change a device's size while it runs: the origin (its image file grows, or shrinks)
    /// or a snapshot (which may grow past its parent: the new range reads zeros). A VM
    /// connected over vhost-user sees the new size at once; NBD clients when they connect
    /// next. Growing copies no data. Shrinking discards the end of the device (snapshots of
    /// it keep their data) and needs --force.
    ///
    /// SIZE is the new size (8G, 512M, 1048576) or +SIZE to grow by that much; a multiple of
    /// the logical block size the devices are served with (512 or 4096 bytes). A block-device
    /// origin must be grown first (lvextend, losetup -c); a remote origin cannot be resized.
    ///
    /// Examples: `snapblk resize origin 20G`, `snapblk resize vm1 +10G`,
    /// `snapblk resize vm1 8G --force`.
    Resize {
        #[command(flatten)]
        control: admin::ControlArg,
        /// The device: "origin" or a snapshot's name.
        name: String,
        /// The new size, or +SIZE to grow by that much.
        #[arg(value_name = "[+]SIZE", value_parser = resize::parse_new_size, allow_hyphen_values = true)]
        size: resize::NewSize,
        /// Allow shrinking: the data past the new end is lost to this device.
        #[arg(long)]
        force: bool,
    },
    /// I/O, copy-on-write and cache-space counters of a running daemon.
    Stats {
        #[command(flatten)]
        control: admin::ControlArg,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The cache object's space: its growth limit, changed at run time.
    Cache {
        #[command(flatten)]
        control: admin::ControlArg,
        #[command(subcommand)]
        command: space::CacheCommand,
    },
    /// A remote origin: fetch its chunks in the background (`hydrate`).
    Origin {
        #[command(flatten)]
        control: admin::ControlArg,
        #[command(subcommand)]
        command: origin::OriginCommand,
    },
    /// Wait for a running daemon's cache object to reach a state (for scripts).
    Wait {
        #[command(flatten)]
        control: admin::ControlArg,
        #[command(subcommand)]
        command: space::WaitCommand,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to standard output, like every other output (`output.rs`).
        Err(e) if !e.use_stderr() => {
            outln!("{}", e.render().to_string().trim_end());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // Every call site's lines are rate-limited (see `log_limit`): a hostile frontend that
    // makes us or a library log on each of its requests cannot fill the disk.
    log_limit::install(
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .format_timestamp_millis()
            .build(),
    );
    let Some(command) = cli.command else {
        if cli.print_capabilities {
            outln!("{}", activation::CAPABILITIES);
            return ExitCode::SUCCESS;
        }
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        return ExitCode::from(2);
    };
    let result = match command {
        Command::Serve(args) => serve::serve(args),
        Command::Snapshot { control, command } => admin::snapshot(&control.control, command),
        Command::Stats { control, json } => admin::stats(&control.control, json),
        Command::Resize {
            control,
            name,
            size,
            force,
        } => resize::resize(&control.control, &name, size, force),
        Command::Cache { control, command } => space::cache(&control.control, command),
        Command::Origin { control, command } => origin::origin(&control.control, command),
        Command::Wait { control, command } => match space::wait(&control.control, command) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(space::EXIT_TIMED_OUT),
            Err(e) => Err(e),
        },
        Command::Export {
            control,
            name,
            writable,
        } => admin::export(&control.control, &name, writable),
        Command::Unexport {
            control,
            name,
            force,
        } => admin::unexport(&control.control, &name, force),
        Command::Check { cache } => return check(&cache),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("snapblk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match crate::cow::check::check_cache_path(path) {
        Ok(report) => {
            outln!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e @ crate::cow::check::CheckError::InUse { .. }) => {
            errln!("snapblk: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            errln!("snapblk: error: cannot check {}: {e}", path.display());
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
