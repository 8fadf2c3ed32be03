//! `snapblk origin hydrate`: a remote origin's chunks not yet local fetched in the
//! background (`docs/control-protocol.md`, `origin-hydrate`).

use super::admin::call;
use super::error::CliError;
use super::output::outln;
use super::units::{human, parse_size};
use crate::control::protocol::Command;
use crate::cow::HydrationInfo;
use clap::Subcommand;
use std::path::Path;
use std::time::Duration;

/// `snapblk origin ...`.
#[derive(Subcommand, Debug)]
pub enum OriginCommand {
    /// Fetch every chunk of a remote origin not yet local into the cache object, in the
    /// background (resumed after a restart); `snapblk stats` shows the progress.
    Hydrate {
        /// Most bytes fetched per second (e.g. 50M); no limit by default.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        rate: Option<u64>,
        /// Stop hydrating (it is not resumed after a restart).
        #[arg(long, conflicts_with = "rate")]
        stop: bool,
        /// Wait until it is done (or stops), printing the progress.
        #[arg(long, conflicts_with = "stop")]
        wait: bool,
    },
}

/// Runs an `origin` subcommand against the daemon at `control`.
pub fn origin(control: &Path, cmd: OriginCommand) -> Result<(), CliError> {
    let OriginCommand::Hydrate { rate, stop, wait } = cmd;
    let reply = call(control, Command::OriginHydrate { rate, stop })?;
    let info: HydrationInfo = serde_json::from_value(reply).map_err(CliError::Reply)?;
    if stop {
        outln!("hydration {} at byte {}", info.state, info.position);
        return Ok(());
    }
    match rate {
        Some(r) => outln!("hydrating the origin at {}/s", human(r)),
        None => outln!("hydrating the origin (no rate limit)"),
    }
    if !wait {
        outln!("progress: snapblk stats (hydration, hydrated_percent)");
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let stats = call(control, Command::Stats)?;
        let cache = &stats["cache"];
        let state = cache["hydration"].as_str().unwrap_or_default().to_string();
        outln!(
            "{}% local, at byte {} ({state})",
            cache["hydrated_percent"],
            cache["hydration_position"]
        );
        if state != "running" {
            return match state.as_str() {
                "done" => Ok(()),
                other => Err(CliError::Refused(format!("hydration {other}"))),
            };
        }
    }
}
