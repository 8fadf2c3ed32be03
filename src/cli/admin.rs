//! The administration commands: clients of a running daemon's control socket.

use super::error::CliError;
use super::output::outln;
use super::units::human;
use crate::control::client::ControlClient;
use crate::control::protocol::{
    Command, DeviceList, DeviceView, DiffView, Reply, Request, StatsView,
};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// Where the daemon's control socket is.
#[derive(Args, Debug, Clone)]
pub struct ControlArg {
    /// Control socket of the daemon.
    #[arg(long, value_name = "PATH", default_value = super::serve::DEFAULT_CONTROL, global = true)]
    pub control: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take an instant snapshot of a device (the origin unless --of names another).
    Create {
        /// Name of the new device.
        name: String,
        /// Device to snapshot: "origin" or a snapshot's name.
        #[arg(long = "of", value_name = "PARENT", default_value = "origin")]
        parent: String,
        /// Make the snapshot writable (default: read-only).
        #[arg(long)]
        writable: bool,
        /// Serve it at once on this vhost-user socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Serial the guest sees (default: the snapshot's name).
        #[arg(long, value_name = "STR")]
        serial: Option<String>,
    },
    /// List devices: the tree, state, space and who is connected.
    List {
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; its blocks pass to its children or are freed, no data is copied.
    Delete {
        name: String,
        /// Delete even if a VM is connected to it (the VM's disk disappears).
        #[arg(long)]
        force: bool,
    },
    /// Roll the origin back to a snapshot's data.
    Restore {
        name: String,
        /// Restore even if a VM is connected to the origin.
        #[arg(long)]
        force: bool,
    },
    /// Serve an existing device on a vhost-user socket (remembered across restarts).
    Serve {
        name: String,
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Stop serving a device on its socket (the device stays).
    Unserve {
        name: String,
        /// Even if a VM is connected.
        #[arg(long)]
        force: bool,
    },
    /// List the extents (byte offset and length) where two devices differ: exactly the
    /// chunks one of them changed since they last shared them (the `qemu:dirty-bitmap:FROM`
    /// of TO's NBD export), for incremental backups.
    Diff {
        /// The older device, e.g. the previous backup's snapshot.
        from: String,
        /// The newer device.
        to: String,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Sends one command and returns the result, or the daemon's error as a CLI error.
pub fn call(control: &Path, cmd: Command) -> Result<serde_json::Value, CliError> {
    let mut client = ControlClient::connect(control)?;
    let reply: Reply = client.call(&Request::new(cmd))?;
    match (reply.ok, reply.result, reply.error) {
        (true, result, _) => Ok(result.unwrap_or(serde_json::Value::Null)),
        (false, _, Some(err)) => Err(CliError::Refused(err.message)),
        (false, _, None) => Err(CliError::Refused("the daemon refused the request".into())),
    }
}

pub fn snapshot(control: &Path, cmd: SnapshotCommand) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create {
            name,
            parent,
            writable,
            socket,
            serial,
        } => {
            let socket = socket.as_deref().map(absolute);
            let result = call(
                control,
                Command::SnapshotCreate {
                    name: name.clone(),
                    parent: parent.clone(),
                    writable,
                    socket: socket.clone(),
                    serial,
                },
            )?;
            let dev: DeviceView = serde_json::from_value(result).map_err(CliError::Reply)?;
            let mode = if dev.writable {
                "writable"
            } else {
                "read-only"
            };
            match socket {
                Some(s) => outln!("created {mode} snapshot {name} of {parent}, serving on {s}"),
                None => outln!("created {mode} snapshot {name} of {parent}"),
            }
        }
        SnapshotCommand::List { json } => {
            let result = call(control, Command::List)?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&result).unwrap_or_default()
                );
            } else {
                let list: DeviceList = serde_json::from_value(result).map_err(CliError::Reply)?;
                print_tree(&list.devices);
            }
        }
        SnapshotCommand::Delete { name, force } => {
            call(
                control,
                Command::SnapshotDelete {
                    name: name.clone(),
                    force,
                },
            )?;
            outln!("deleted {name}");
        }
        SnapshotCommand::Restore { name, force } => {
            call(
                control,
                Command::Restore {
                    name: name.clone(),
                    force,
                },
            )?;
            outln!("origin restored to {name}");
        }
        SnapshotCommand::Serve { name, socket } => {
            let socket = absolute(&socket);
            call(
                control,
                Command::Serve {
                    name: name.clone(),
                    socket: socket.clone(),
                },
            )?;
            outln!("serving {name} on {socket}");
        }
        SnapshotCommand::Diff { from, to, json } => diff(control, from, to, json)?,
        SnapshotCommand::Unserve { name, force } => {
            call(
                control,
                Command::Unserve {
                    name: name.clone(),
                    force,
                },
            )?;
            outln!("stopped serving {name}");
        }
    }
    Ok(())
}

/// `snapshot diff`: asks page after page, prints the extents (or all of them as JSON).
fn diff(control: &Path, from: String, to: String, json: bool) -> Result<(), CliError> {
    let mut all: Option<DiffView> = None;
    let mut offset = 0;
    loop {
        let cmd = Command::SnapshotDiff {
            from: from.clone(),
            to: to.clone(),
            offset,
            max_extents: None,
        };
        let page: DiffView =
            serde_json::from_value(call(control, cmd)?).map_err(CliError::Reply)?;
        let next = page.next_offset;
        match &mut all {
            None => all = Some(page),
            Some(all) => {
                let mut extents = page.extents.into_iter();
                // A page may end inside a run of changes: join it up with the next page.
                if let (Some(last), Some(first)) = (all.extents.last_mut(), extents.next()) {
                    if last.offset + last.length == first.offset {
                        last.length += first.length;
                    } else {
                        all.extents.push(first);
                    }
                }
                all.extents.extend(extents);
            }
        }
        match next {
            Some(n) if n > offset => offset = n,
            _ => break,
        }
    }
    let Some(mut all) = all else { return Ok(()) };
    all.next_offset = None;
    if json {
        outln!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return Ok(());
    }
    outln!("{:>16} {:>16}", "OFFSET", "LENGTH");
    for e in &all.extents {
        outln!("{:>16} {:>16}", e.offset, e.length);
    }
    let changed: u64 = all.extents.iter().map(|e| e.length).sum();
    outln!(
        "{} extent(s), {} of {} changed between {} and {} (chunk {})",
        all.extents.len(),
        human(changed),
        human(all.size),
        all.from,
        all.to,
        human(all.chunk_size)
    );
    Ok(())
}

pub fn export(control: &Path, name: &str, writable: bool) -> Result<(), CliError> {
    let name = name.to_string();
    call(
        control,
        Command::Export {
            name: name.clone(),
            writable,
        },
    )?;
    let list: DeviceList =
        serde_json::from_value(call(control, Command::List)?).map_err(CliError::Reply)?;
    let uri = list
        .devices
        .iter()
        .find(|d| d.name == name)
        .and_then(|d| d.nbd_uri.clone());
    let mode = if writable { "writable" } else { "read-only" };
    match uri {
        Some(uri) => outln!("exported {name} ({mode}): {uri}"),
        None => outln!("exported {name} ({mode})"),
    }
    Ok(())
}

pub fn unexport(control: &Path, name: &str, force: bool) -> Result<(), CliError> {
    let name = name.to_string();
    call(
        control,
        Command::Unexport {
            name: name.clone(),
            force,
        },
    )?;
    outln!("stopped exporting {name}");
    Ok(())
}

/// Prints devices as an indented tree, children under their parent, then the NBD URIs.
fn print_tree(devices: &[DeviceView]) {
    outln!(
        "{:<24} {:<4} {:<11} {:>10} {:>10} {:>10} {:>10} {:<10} {:<6} SOCKET",
        "NAME",
        "MODE",
        "STATE",
        "SIZE",
        "OWNED",
        "SHARED",
        "PRESERVED",
        "VM",
        "NBD"
    );
    fn walk(devices: &[DeviceView], parent: Option<&str>, depth: usize) {
        for d in devices.iter().filter(|d| d.parent.as_deref() == parent) {
            let name = format!("{}{}", "  ".repeat(depth), d.name);
            let mode = if d.writable { "rw" } else { "ro" };
            let vm = if d.connected { "connected" } else { "-" };
            let nbd = match (d.export.as_deref(), d.nbd_clients) {
                (None, _) => "-".to_string(),
                (Some("writable"), 0) => "rw".to_string(),
                (Some(_), 0) => "ro".to_string(),
                (Some(e), n) => format!("{}+{n}", if e == "writable" { "rw" } else { "ro" }),
            };
            outln!(
                "{:<24} {:<4} {:<11} {:>10} {:>10} {:>10} {:>10} {:<10} {:<6} {}",
                name,
                mode,
                d.state,
                human(d.size),
                human(d.owned_bytes),
                human(d.shared_bytes),
                human(d.preserved_bytes),
                vm,
                nbd,
                d.socket.as_deref().unwrap_or("-")
            );
            walk(devices, Some(&d.name), depth + 1);
        }
    }
    walk(devices, None, 0);
    let uris: Vec<_> = devices
        .iter()
        .filter_map(|d| Some((&d.name, d.nbd_uri.as_ref()?)))
        .collect();
    if !uris.is_empty() {
        outln!("\nNBD (ro: read-only, rw: writable, +N: clients connected):");
        for (name, uri) in uris {
            outln!("  {name:<22} {uri}");
        }
    }
}

pub fn stats(control: &Path, json: bool) -> Result<(), CliError> {
    let result = call(control, Command::Stats)?;
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return Ok(());
    }
    let stats: StatsView = serde_json::from_value(result).map_err(CliError::Reply)?;
    outln!("cache object:");
    for (k, v) in &stats.cache {
        outln!("  {k:<22} {v}");
    }
    outln!(
        "{:<20} {:>10} {:>12} {:>10} {:>12} {:>8} {:>8} {:>7}",
        "DEVICE",
        "READS",
        "READ",
        "WRITES",
        "WRITTEN",
        "FLUSHES",
        "DISCARDS",
        "ERRORS"
    );
    for (name, io) in &stats.devices {
        outln!(
            "{:<20} {:>10} {:>12} {:>10} {:>12} {:>8} {:>8} {:>7}",
            name,
            io.reads,
            human(io.read_bytes),
            io.writes,
            human(io.write_bytes),
            io.flushes,
            io.discards + io.write_zeroes,
            io.errors
        );
    }
    for (name, io) in &stats.devices {
        if io.aligned + io.bounced + io.peak_in_flight > 0 {
            outln!(
                "{name}: direct I/O {} in place, {} bounced, up to {} in flight on a queue",
                io.aligned,
                io.bounced,
                io.peak_in_flight
            );
        }
    }
    Ok(())
}
