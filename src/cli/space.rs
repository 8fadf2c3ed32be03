//! The cache object's space from the command line: `snapblk cache resize SIZE|auto`, `snapblk
//! wait low-space`, and how `--cache-size` and `--on-full` are written.

use super::admin::call;
use super::error::CliError;
use super::output::outln;
use super::units::{human, parse_cache_size};
use crate::control::protocol::{Command, LowSpace, MAX_WAIT_MS};
use crate::cow::SizeLimit;
use clap::Subcommand;
use std::path::Path;
use std::time::{Duration, Instant};

/// Exit status of `snapblk wait` when its timeout passed first (as `timeout(1)`'s).
pub const EXIT_TIMED_OUT: u8 = 124;

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Set the growth limit of the cache object at run time, durably: a size (20G) or
    /// `auto` (the free space of its file system less 5% of it, at most 1 GiB). Raising is
    /// always allowed and wakes writes waiting for space; a limit below the space in use is
    /// refused.
    Resize {
        #[arg(value_name = "SIZE|auto", value_parser = parse_cache_size)]
        size: SizeLimit,
    },
}

#[derive(Subcommand, Debug)]
pub enum WaitCommand {
    /// Return when the cache object is low on space (`stats`: `low_space`), at once if it is
    /// already. Exit status 0 then, 124 if the timeout passed first.
    LowSpace {
        /// Give up after this many seconds (default: wait for ever).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
}

/// `snapblk cache ...`.
pub fn cache(control: &Path, cmd: CacheCommand) -> Result<(), CliError> {
    let CacheCommand::Resize { size } = cmd;
    let (size, auto) = match size {
        SizeLimit::Fixed(bytes) => (Some(bytes), false),
        SizeLimit::Auto => (None, true),
    };
    let stats = call(control, Command::CacheResize { size, auto })?;
    let get = |k: &str| stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    if auto {
        outln!(
            "cache object limit: its file system's free space less {} (now {})",
            human(get("host_reserve_bytes")),
            human(get("limit_bytes"))
        );
    } else {
        outln!("cache object limit: {}", human(get("limit_bytes")));
    }
    outln!(
        "in use {}, free {}",
        human(get("used_bytes")),
        human(get("free_bytes"))
    );
    Ok(())
}

/// `snapblk wait low-space`: true when the cache object is low on space, false when the
/// timeout passed first. Asks the daemon in waits of at most a minute, so a client that goes
/// away leaves no wait behind for long.
pub fn wait(control: &Path, cmd: WaitCommand) -> Result<bool, CliError> {
    let WaitCommand::LowSpace { timeout } = cmd;
    let deadline = match timeout {
        Some(secs) => Some(
            Instant::now()
                + Duration::try_from_secs_f64(secs)
                    .map_err(|_| CliError::Usage(format!("'{secs}' is not a timeout")))?,
        ),
        None => None,
    };
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let ms = left.map_or(MAX_WAIT_MS, |l| (l.as_millis() as u64).min(MAX_WAIT_MS));
        let reply = call(
            control,
            Command::WaitLowSpace {
                timeout_ms: Some(ms),
            },
        )?;
        let r: LowSpace = serde_json::from_value(reply).map_err(CliError::Reply)?;
        if r.low_space {
            outln!(
                "cache object low on space: {} free (threshold {}, limit {})",
                human(r.free_bytes),
                human(r.low_space_threshold),
                human(r.limit_bytes)
            );
            return Ok(true);
        }
        if left.is_some_and(|l| l.as_millis() as u64 <= ms) {
            outln!(
                "cache object not low on space: {} free",
                human(r.free_bytes)
            );
            return Ok(false);
        }
    }
}
