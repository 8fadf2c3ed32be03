//! `snapblk serve`: its options, opening or creating the origin and the cache object,
//! serving every device until SIGINT/SIGTERM, and the attach help it prints.

use super::disks::{self, parse_engine, Disks, EngineChoice};
pub use super::disks::{DEFAULT_CACHE, DEFAULT_ORIGIN};
use super::error::CliError;
use super::output::{outln, sayln};
use super::remote::{self, RemoteArgs};
use super::units::{human, parse_cache_size, parse_on_full, parse_size};
use crate::control::ControlServer;
use crate::cow::{OnFull, SizeLimit};
use crate::daemon::{Daemon, ServeDefaults};
use crate::device::{BlockDevice, RawDevice};
use crate::nbd::{NbdOptions, NbdServer, MAX_CONNECTIONS};
use crate::storage::{OpenFlags, Storage};
use crate::vhost::{DeviceServer, Scheduler, SchedulerConfig, ServeOptions};
use clap::Args;
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the daemon keeps its files when no paths are given.
pub const DEFAULT_DIR: &str = "snapblk-data";
pub const DEFAULT_SOCKET: &str = "snapblk-data/origin.sock";
pub const DEFAULT_CONTROL: &str = "snapblk-data/control.sock";
pub const DEFAULT_NBD: &str = "snapblk-data/nbd.sock";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Raw origin image: a file (the default one is created sparse if missing) or a block
    /// device; or a remote image on an NBD server: nbd+unix:///EXPORT?socket=PATH or
    /// nbd://HOST[:PORT]/EXPORT, served read-only, its chunks copied into the cache object as
    /// they are read.
    #[arg(long, alias = "blk-file", value_name = "PATH|URI", default_value = DEFAULT_ORIGIN)]
    pub origin: PathBuf,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Size of the origin image to create when it does not exist (e.g. 8G, 512M, 1T).
    /// Ignored when the image exists.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Unix socket the VMM connects to. A stale socket is replaced; a live one is refused.
    #[arg(long, alias = "socket-path", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Serve the origin on this inherited listening unix socket instead of binding
    /// --socket (its path takes --socket's place). Without it, a socket passed by systemd
    /// socket activation (LISTEN_FDS) is served.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Print the vhost-user backend capabilities (JSON) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Number of virtqueues offered (each gets its own worker thread).
    #[arg(long, value_name = "N", default_value_t = default_queues(), value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Maximum virtqueue size offered (a power of two, 2..=1024).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serve the image read-only (VIRTIO_BLK_F_RO); writes fail with an I/O error.
    #[arg(long)]
    pub read_only: bool,

    /// Serial number reported to the guest (GET_ID; at most 20 bytes are shown).
    #[arg(long, value_name = "STR", default_value = "snapblk")]
    pub serial: String,

    /// Logical block size reported to the guest (512 or 4096). Default: the origin's and the
    /// cache object's (4096 on a device with 4 KiB sectors), else 512; a smaller one than
    /// theirs is refused.
    #[arg(long, value_name = "BYTES", value_parser = parse_block_size)]
    pub logical_block_size: Option<u32>,

    /// Direct I/O (like QEMU's cache=none): the origin and the cache object are opened with
    /// O_DIRECT, so their data is not cached by the host as well as by the guest. FLUSH still
    /// syncs them.
    #[arg(long)]
    pub direct: bool,

    /// I/O engine of guest reads and writes: `auto` (io_uring with --direct, when the kernel
    /// allows it; sync otherwise), `io_uring` or `sync`. SNAPBLK_NO_IO_URING=1 in the
    /// environment makes io_uring unavailable (the fallback, logged).
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub io_engine: EngineChoice,

    /// Permission bits of the vhost-user and control sockets, in octal (0600: only the
    /// owner may connect; 0660 lets the socket's group in).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Cache object holding every snapshot's blocks: a file (created if missing) or a block
    /// device (made one if its first 8 KiB are zeros; its size is the limit). Default:
    /// snapblk-data/cache.obj for the default origin and for a remote one, ORIGIN.cache
    /// beside any other file.
    #[arg(long, value_name = "PATH", conflicts_with = "no_cache")]
    pub cache: Option<PathBuf>,

    /// Control socket for `snapblk snapshot ...` and `snapblk stats`. Default:
    /// snapblk-data/control.sock beside the default socket, SOCKET-STEM.control.sock beside
    /// any other.
    #[arg(long, value_name = "PATH", conflicts_with = "no_cache")]
    pub control: Option<PathBuf>,

    /// Copy-on-write chunk size of a new cache object (power of two, 4K..1M).
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
    pub chunk_size: u64,

    /// Growth limit of the cache object file: a size (20G) or `auto`, the default for a new
    /// cache object: it grows while its file system keeps 5% of its size (at most 1 GiB)
    /// free. Given for an existing cache object it sets its limit (a limit below what is in
    /// use is refused with a warning). `snapblk cache resize` changes it at run time.
    #[arg(long, value_name = "SIZE|auto", value_parser = parse_cache_size)]
    pub cache_size: Option<SizeLimit>,

    /// What a write to a writable snapshot does when the cache object has no space: `error`
    /// (fail at once with an I/O error) or `wait[=SECS]` (wait until space is freed or the
    /// limit raised, then go on; fail with an I/O error after SECS). The origin never fails
    /// for lack of space: the snapshots it cannot preserve go inoperative.
    #[arg(long, value_name = "POLICY", default_value = "wait=60", value_parser = parse_on_full)]
    pub on_full: OnFull,

    /// Warn (log, stats) when free cache space falls below this (default: 10% of the limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub low_space: Option<u64>,

    /// Microseconds a queue worker keeps polling its ring after a batch before sleeping
    /// until the next kick: lower latency at low queue depth for some CPU (0 disables).
    #[arg(long, value_name = "US", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub poll_us: u32,

    /// NBD socket: every device is an NBD export named after it (the origin is "origin"),
    /// read-only unless `snapblk export NAME --writable`, for qemu-img, nbdcopy, nbdinfo
    /// (e.g. `nbdinfo --list nbd+unix:///?socket=PATH`). Default: snapblk-data/nbd.sock beside
    /// the default socket, SOCKET-STEM.nbd.sock beside any other.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["no_cache", "no_nbd"])]
    pub nbd: Option<PathBuf>,

    /// Also serve NBD on TCP at this address (e.g. 127.0.0.1:10809; off unless given). There
    /// is no TLS and no authentication: whoever reaches the port can read every export.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "no_cache")]
    pub nbd_listen: Option<String>,

    /// Most NBD connections served at once; clients past it are told the server is full.
    #[arg(long, value_name = "N", default_value_t = MAX_CONNECTIONS, value_parser = parse_connections)]
    pub nbd_max_connections: usize,

    /// No NBD unix socket (`--nbd-listen` still serves TCP if given).
    #[arg(long, conflicts_with = "no_cache")]
    pub no_nbd: bool,

    /// Serve the raw origin alone: no cache object, no snapshots, no control socket, no NBD.
    #[arg(long)]
    pub no_cache: bool,
}

fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(8) as u16)
        .unwrap_or(1)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (2..=1024).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{s}' is not a power of two between 2 and 1024")),
    }
}

fn parse_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a number of connections from 1 to 1024"
        )),
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("'{s}': the logical block size must be 512 or 4096")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not an octal permission mode like 0600 or 0660"))
}

fn ensure_origin(args: &ServeArgs) -> Result<(), CliError> {
    if args.origin.exists() {
        return Ok(());
    }
    let is_default = args.origin == Path::new(DEFAULT_ORIGIN);
    let size = match (args.size, is_default) {
        (Some(size), _) => size,
        (None, true) => 8 << 30,
        (None, false) => return Err(CliError::MissingOrigin(args.origin.clone())),
    };
    if args.read_only {
        return Err(CliError::Usage(format!(
            "origin image {} does not exist; a read-only device cannot create it",
            args.origin.display()
        )));
    }
    if is_default {
        fs::create_dir_all(DEFAULT_DIR).map_err(|source| CliError::Create {
            path: DEFAULT_DIR.into(),
            source,
        })?;
    }
    let create = |path: &Path| -> std::io::Result<()> {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        f.set_len(size)
    };
    create(&args.origin).map_err(|source| CliError::Create {
        path: args.origin.clone(),
        source,
    })?;
    info!(
        "created sparse origin image {} of {} bytes",
        args.origin.display(),
        size
    );
    Ok(())
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn serve(mut args: ServeArgs) -> Result<(), CliError> {
    if args.print_capabilities {
        outln!("{}", super::activation::CAPABILITIES);
        return Ok(());
    }
    if let Some(path) = super::activation::adopt_listener(args.fd)? {
        args.socket = path;
    }
    let uri = remote::remote_uri(&args.origin, args.size, args.no_cache)?;
    // A remote origin is read-only; its files go to the default directory.
    args.read_only |= uri.is_some();
    let defaults_here =
        args.origin == Path::new(DEFAULT_ORIGIN) || (uri.is_some() && args.cache.is_none());
    if args.socket == Path::new(DEFAULT_SOCKET) || defaults_here {
        fs::create_dir_all(DEFAULT_DIR).map_err(|source| CliError::Create {
            path: DEFAULT_DIR.into(),
            source,
        })?;
    }
    if uri.is_none() {
        ensure_origin(&args)?;
    }
    // Install the handlers before serving so an early SIGTERM still shuts down cleanly.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(CliError::Signals)?;
    if args.no_cache {
        return serve_raw(&args, &mut signals);
    }
    let disks = Disks {
        origin: &args.origin,
        remote: uri.is_some(),
        cache: args.cache.as_deref(),
        read_only: args.read_only,
        direct: args.direct,
        chunk_size: args.chunk_size,
        cache_size: args.cache_size,
        low_space: args.low_space,
    };
    let origin: Arc<dyn Storage> = match uri.clone() {
        Some(uri) => remote::connect(uri, &args.remote)?,
        None => disks::open_origin(&disks)?,
    };
    let cache_path = disks::cache_path(&disks)?;
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| beside_socket(&args.socket, DEFAULT_CONTROL, "control"));
    let engine = Arc::new(disks::open_cache(&disks, origin, &cache_path)?);
    engine.set_on_full(args.on_full);
    let logical_block_size = disks::block_size(args.logical_block_size, engine.block_sizes().0)?;
    let io_engine = disks::choose_engine(args.io_engine, args.direct);
    engine.hydrate_resume();
    let defaults = ServeDefaults {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        logical_block_size,
        io_engine,
        socket_mode: args.socket_mode,
        origin_read_only: args.read_only,
        poll: Duration::from_micros(args.poll_us.into()),
        origin_serial: args.serial.clone(),
    };
    let daemon = Daemon::new(engine.clone(), defaults);
    daemon.serve_all(&args.socket)?;
    let nbd = start_nbd(&args, &daemon)?;
    let control = ControlServer::start(&control_path, args.socket_mode, daemon.clone())?;
    print_attach_help(&args, engine.origin_size());
    print_nbd_help(nbd.as_ref());
    sayln!(
        "Cache object {} (chunk {}); control socket {}",
        cache_path.display(),
        human(engine.chunk_size()),
        control.path().display()
    );
    sayln!(
        "I/O: {}, {}, {logical_block_size}-byte logical blocks",
        if args.direct { "direct" } else { "buffered" },
        io_engine.name()
    );
    super::activation::notify_ready();

    let signal = signals.forever().next();
    info!("received signal {signal:?}: finishing in-flight requests and shutting down");
    // Waits for space and for low space would hold up the control socket and the queues.
    engine.close_waits();
    engine.hydrate_pause();
    drop(control);
    drop(nbd);
    daemon.shutdown().map_err(|source| CliError::FlushCache {
        path: cache_path.clone(),
        source,
    })?;
    info!("shut down cleanly");
    Ok(())
}

/// A default path beside the vhost-user socket: `default` beside the default socket,
/// `SOCKET-STEM.WHAT.sock` beside any other.
fn beside_socket(socket: &Path, default: &str, what: &str) -> PathBuf {
    if socket == Path::new(DEFAULT_SOCKET) {
        return PathBuf::from(default);
    }
    let stem = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    socket.with_file_name(format!("{stem}.{what}.sock"))
}

/// Starts the NBD server where the options say (nowhere with `--no-nbd` and no TCP).
fn start_nbd(args: &ServeArgs, daemon: &Daemon) -> Result<Option<NbdServer>, CliError> {
    let unix = match (args.no_nbd, &args.nbd) {
        (true, _) => None,
        (false, Some(p)) => Some(p.clone()),
        (false, None) => Some(beside_socket(&args.socket, DEFAULT_NBD, "nbd")),
    };
    if unix.is_none() && args.nbd_listen.is_none() {
        return Ok(None);
    }
    let opts = NbdOptions {
        unix,
        tcp: args.nbd_listen.clone(),
        socket_mode: args.socket_mode,
        max_connections: args.nbd_max_connections,
    };
    Ok(Some(NbdServer::start(daemon.nbd().clone(), &opts)?))
}

fn print_nbd_help(nbd: Option<&NbdServer>) {
    let Some(nbd) = nbd else { return };
    if let Some(path) = nbd.unix_path() {
        let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        sayln!(
            "NBD exports (every device, by name) on {}: nbdinfo --list 'nbd+unix:///?socket={}'",
            path.display(),
            path.display()
        );
    }
    if let Some(addr) = nbd.tcp_addr() {
        sayln!("NBD exports on TCP {addr}: nbdinfo --list nbd://{addr}");
    }
}

/// `--no-cache`: the raw origin on its socket, nothing else.
fn serve_raw(args: &ServeArgs, signals: &mut Signals) -> Result<(), CliError> {
    let flags = OpenFlags {
        read_only: args.read_only,
        direct: args.direct,
    };
    let wanted = args.logical_block_size.unwrap_or(512);
    let device = Arc::new(RawDevice::open(&args.origin, flags, wanted)?);
    let logical_block_size = disks::block_size(
        args.logical_block_size,
        device.storage().logical_block_size(),
    )?;
    let opts = ServeOptions {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        serial: args.serial.clone(),
        logical_block_size,
        read_only: args.read_only,
        poll: Duration::from_micros(args.poll_us.into()),
    };
    let dev: Arc<dyn BlockDevice> = device.clone();
    let sched = Arc::new(Scheduler::new(SchedulerConfig {
        engine: disks::choose_engine(args.io_engine, args.direct),
        ..SchedulerConfig::default()
    }));
    let server = DeviceServer::start("origin", &args.socket, args.socket_mode, dev, opts, sched)?;
    print_attach_help(args, device.capacity());
    super::activation::notify_ready();
    let signal = signals.forever().next();
    info!("received signal {signal:?}: finishing in-flight requests and shutting down");
    server.stop();
    device.flush().map_err(|source| CliError::Flush {
        path: args.origin.clone(),
        source,
    })?;
    info!("shut down cleanly");
    Ok(())
}

fn print_attach_help(args: &ServeArgs, capacity: u64) {
    let sock = fs::canonicalize(&args.socket).unwrap_or_else(|_| args.socket.clone());
    let mode = if args.read_only {
        "read-only"
    } else {
        "read-write"
    };
    sayln!(
        "snapblk: serving {} ({}, {mode}, {} queue(s)) on {}",
        args.origin.display(),
        human(capacity),
        args.num_queues,
        sock.display()
    );
    sayln!("Attach with QEMU (guest RAM must be shared memory):");
    sayln!(
        "  -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=snapblk0,path={} \\\n  \
         -device vhost-user-blk-pci,chardev=snapblk0,num-queues={}",
        sock.display(),
        args.num_queues
    );
    sayln!("Attach with cloud-hypervisor:");
    sayln!(
        "  --memory size=<RAM>,shared=on --disk vhost_user=true,socket={},num_queues={}",
        sock.display(),
        args.num_queues
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sockets_sit_beside_the_vhost_socket() {
        let p = beside_socket(Path::new(DEFAULT_SOCKET), DEFAULT_NBD, "nbd");
        assert_eq!(p, Path::new("snapblk-data/nbd.sock"));
        let p = beside_socket(Path::new("/run/vm/disk.sock"), DEFAULT_NBD, "nbd");
        assert_eq!(p, Path::new("/run/vm/disk.nbd.sock"));
        let p = beside_socket(Path::new("/run/vm/disk.sock"), DEFAULT_CONTROL, "control");
        assert_eq!(p, Path::new("/run/vm/disk.control.sock"));
    }

    #[test]
    fn queue_sizes_and_modes() {
        assert_eq!(parse_queue_size("256"), Ok(256));
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("2048").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("999").is_err());
    }
}
