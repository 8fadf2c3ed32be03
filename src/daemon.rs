//! The daemon: one origin and its snapshots from one cache object, each device served on its
//! own vhost-user socket.
//!
//! [`Daemon`] keeps the registry of devices (each one's [`CowDevice`] adapter and, when served,
//! its [`DeviceServer`]) and their lifecycle: serve at start, create, delete, restore, serve
//! and unserve, export and unexport over NBD, stop. The control plane (`control::handler`)
//! calls these. The registry lock is taken by lifecycle calls only; the data path goes from a
//! queue worker (or an NBD connection) straight to the device and the engine.
//!
//! Every device is an NBD export ([`nbd::Registry`]), read-only unless made writable, hidden
//! once unexported; how is persisted as the device attribute [`ATTR_NBD`].

use crate::cow::{CacheObject, CowError, DeviceId, DeviceInfo};
use crate::device::CowDevice;
use crate::nbd::{self, Mode};
use crate::vhost::{DeviceServer, IoEngine, Scheduler, SchedulerConfig, ServeError, ServeOptions};
use log::{info, warn};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// Device attribute keys persisted in the cache object.
pub const ATTR_SOCKET: &str = "socket";
pub const ATTR_SERIAL: &str = "serial";
/// How a device is exported over NBD: `off` (unexported) or `rw` (writable); absent means
/// read-only, the default of every device.
pub const ATTR_NBD: &str = "nbd";

/// The name the origin is known by in the control protocol.
pub const ORIGIN_NAME: &str = "origin";

/// Longest snapshot name a user may give.
const MAX_NAME: usize = 64;

/// How devices are served unless a request says otherwise.
#[derive(Clone, Debug)]
pub struct ServeDefaults {
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub socket_mode: u32,
    /// Serve the origin read-only.
    pub origin_read_only: bool,
    /// Serial of the origin.
    pub origin_serial: String,
    /// Ring polling after each batch (see `ServeOptions::poll`).
    pub poll: std::time::Duration,
    /// The engine of aligned reads and writes (io_uring for direct I/O).
    pub io_engine: IoEngine,
}

/// Why a lifecycle call failed.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("no device named {0:?}")]
    NotFound(String),
    /// The request names something that cannot be (a bad name, serial or socket path, or an
    /// operation the device does not allow).
    #[error("{0}")]
    Invalid(String),
    /// A VM is connected and the call was not forced.
    #[error("{0}")]
    Busy(String),
    #[error("{0} is already served")]
    AlreadyServed(String),
    #[error("{0} is not served")]
    NotServed(String),
    #[error("{source}")]
    Serve {
        #[source]
        source: ServeError,
    },
    #[error("restored, but the origin could not be served again: {source}")]
    ServeAgain {
        #[source]
        source: ServeError,
    },
    #[error(transparent)]
    Engine(#[from] CowError),
}

pub(crate) type Outcome<T> = Result<T, DaemonError>;

/// One device as the registry sees it: the engine's record plus how it is served.
pub struct DeviceStatus {
    /// The engine's record of the device.
    pub info: DeviceInfo,
    /// The name users give (the origin is [`ORIGIN_NAME`]).
    pub name: String,
    /// The parent's name, `None` for the origin.
    pub parent: Option<String>,
    /// The socket it is served on, or recorded to be served on.
    pub socket: Option<String>,
    /// A frontend is connected right now.
    pub connected: bool,
    /// Its block-device adapter (for its I/O counters), once it was served.
    pub device: Option<Arc<CowDevice>>,
    /// How it is exported over NBD (`None`: not exported), the URI to open it with, and the
    /// NBD clients connected now.
    pub export: Option<Mode>,
    pub nbd_uri: Option<String>,
    pub nbd_clients: usize,
}

struct Served {
    device: Arc<CowDevice>,
    server: Option<DeviceServer>,
}

/// The running daemon's devices.
pub struct Daemon {
    engine: Arc<CacheObject>,
    defaults: ServeDefaults,
    /// Schedules the requests of every served device (shared thread pools and CPU budget).
    scheduler: Arc<Scheduler>,
    /// Devices by id: their block-device adapter (kept so counters survive unserve/serve)
    /// and their server, if served.
    registry: Mutex<HashMap<u64, Served>>,
    /// The NBD exports, over the same adapters.
    nbd: Arc<nbd::Registry>,
}

/// The name users know a device by.
pub(crate) fn user_name(d: &DeviceInfo) -> String {
    if d.id == DeviceId::ORIGIN.0 {
        ORIGIN_NAME.to_string()
    } else {
        d.name.clone()
    }
}

impl Daemon {
    /// Takes over an opened engine; serve the devices with [`Daemon::serve_all`].
    pub fn new(engine: Arc<CacheObject>, defaults: ServeDefaults) -> Arc<Self> {
        let io_engine = defaults.io_engine;
        // Origin writes waiting for a commit complete before it (cow/held.rs); without the
        // thread they wait in the request, as before.
        if let Err(e) = engine.start_write_behind() {
            log::warn!("origin writes wait for their commits: no committer thread ({e})");
        }
        Arc::new(Daemon {
            nbd: nbd::Registry::new(engine.clone()),
            engine,
            defaults,
            scheduler: Arc::new(Scheduler::new(SchedulerConfig {
                engine: io_engine,
                ..SchedulerConfig::default()
            })),
            registry: Mutex::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &Arc<CacheObject> {
        &self.engine
    }

    /// The NBD exports (for the NBD server).
    pub fn nbd(&self) -> &Arc<nbd::Registry> {
        &self.nbd
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<u64, Served>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the origin on `origin_socket` and every snapshot that has a socket recorded,
    /// and exports every device over NBD as recorded. A snapshot whose socket cannot be bound
    /// is logged and left unserved; the origin's failure is an error.
    pub fn serve_all(&self, origin_socket: &Path) -> Result<(), ServeError> {
        let mut reg = self.registry();
        self.start_server(&mut reg, DeviceId::ORIGIN, origin_socket)?;
        for dev in self.engine.devices() {
            let adapter = self.adapter(&mut reg, DeviceId(dev.id));
            let mode = self.export_mode(&dev);
            self.nbd
                .set(&user_name(&dev), DeviceId(dev.id), adapter, mode);
            if dev.id == DeviceId::ORIGIN.0 {
                continue;
            }
            if let Some(sock) = dev.attrs.get(ATTR_SOCKET) {
                if let Err(e) = self.start_server(&mut reg, DeviceId(dev.id), Path::new(sock)) {
                    warn!("snapshot {}: cannot serve on {sock}: {e}", dev.name);
                }
            }
        }
        Ok(())
    }

    /// Whether `info` may be written (the origin as the daemon was told).
    pub(crate) fn device_writable(&self, info: &DeviceInfo) -> bool {
        match info.id == DeviceId::ORIGIN.0 {
            true => !self.defaults.origin_read_only,
            false => info.writable,
        }
    }

    /// Records how device `dev` is exported over NBD, then exports it so (both with the
    /// registry lock held: no delete can come in between).
    pub(crate) fn set_export(&self, dev: &DeviceInfo, mode: Mode) -> Outcome<()> {
        let mut reg = self.registry();
        let id = DeviceId(dev.id);
        let value = match mode {
            Mode::Hidden => Some("off"),
            Mode::Writable => Some("rw"),
            Mode::ReadOnly => None,
        };
        self.engine.set_device_attr(id, ATTR_NBD, value)?;
        let adapter = self.adapter(&mut reg, id);
        self.nbd.set(&user_name(dev), id, adapter, mode);
        Ok(())
    }

    /// How device `info` is exported, as recorded (writable only if the device is).
    fn export_mode(&self, info: &DeviceInfo) -> Mode {
        match info.attrs.get(ATTR_NBD).map(String::as_str) {
            Some("off") => Mode::Hidden,
            Some("rw") if self.device_writable(info) => Mode::Writable,
            _ => Mode::ReadOnly,
        }
    }

    fn adapter(&self, reg: &mut HashMap<u64, Served>, id: DeviceId) -> Arc<CowDevice> {
        reg.entry(id.0)
            .or_insert_with(|| Served {
                device: Arc::new(CowDevice::new(self.engine.clone(), id)),
                server: None,
            })
            .device
            .clone()
    }

    /// How device `info` is served: the daemon's defaults, its own serial, read-only unless
    /// writable (the origin as the daemon was told).
    fn serve_options(&self, info: &DeviceInfo) -> ServeOptions {
        let (read_only, serial) = if info.id == DeviceId::ORIGIN.0 {
            (
                self.defaults.origin_read_only,
                self.defaults.origin_serial.clone(),
            )
        } else {
            let serial = info.attrs.get(ATTR_SERIAL).unwrap_or(&info.name).clone();
            (!info.writable, serial)
        };
        ServeOptions {
            num_queues: self.defaults.num_queues,
            queue_size: self.defaults.queue_size,
            serial,
            logical_block_size: self.defaults.logical_block_size,
            read_only,
            poll: self.defaults.poll,
        }
    }

    fn start_server(
        &self,
        reg: &mut HashMap<u64, Served>,
        id: DeviceId,
        socket: &Path,
    ) -> Result<(), ServeError> {
        let info = self
            .engine
            .device(id)
            .ok_or_else(|| ServeError::Setup(std::io::Error::other(format!("no device {id}"))))?;
        let opts = self.serve_options(&info);
        let device = self.adapter(reg, id);
        let server = DeviceServer::start(
            &info.name,
            socket,
            self.defaults.socket_mode,
            device,
            opts,
            self.scheduler.clone(),
        )?;
        info!("serving {} on {}", info.name, socket.display());
        if let Some(s) = reg.get_mut(&id.0) {
            s.server = Some(server);
        }
        Ok(())
    }

    /// Stops every server (frontends are disconnected after their in-flight requests), then
    /// makes everything durable.
    pub fn shutdown(&self) -> Result<(), CowError> {
        // Requests waiting for space would hold their queues (and the stop) up.
        self.engine.close_waits();
        let servers: Vec<DeviceServer> = self
            .registry()
            .values_mut()
            .filter_map(|s| s.server.take())
            .collect();
        for s in servers {
            s.stop();
        }
        self.engine.flush()
    }

    /// The device users call `name` (the origin is [`ORIGIN_NAME`]).
    pub(crate) fn find(&self, name: &str) -> Outcome<DeviceInfo> {
        self.engine
            .devices()
            .into_iter()
            .find(|d| d.name == name || (name == ORIGIN_NAME && d.id == DeviceId::ORIGIN.0))
            .ok_or_else(|| DaemonError::NotFound(name.to_string()))
    }

    /// Tells the frontend connected to device `id`, if any, that its config space changed.
    pub(crate) fn config_changed(&self, id: DeviceId) -> bool {
        let reg = self.registry();
        let server = reg.get(&id.0).and_then(|s| s.server.as_ref());
        server.is_some_and(|srv| srv.config_changed())
    }

    /// The daemon's serving defaults.
    pub(crate) fn defaults(&self) -> &ServeDefaults {
        &self.defaults
    }

    /// Stops serving device `id` (if it is served): with `force` whatever is connected, else
    /// only if no frontend is connected (`Err` then, and it stays served). Its requests
    /// waiting for space fail first (a stop waits for the requests in flight), unless a
    /// frontend that stays connected is theirs.
    fn stop_serving(&self, reg: &mut HashMap<u64, Served>, id: u64, force: bool) -> Result<(), ()> {
        let Some(served) = reg.get_mut(&id) else {
            return Ok(());
        };
        let connected = served
            .server
            .as_ref()
            .is_some_and(|srv| srv.stats.connected.load(Ordering::SeqCst));
        if force || !connected {
            self.engine.cancel_waits(DeviceId(id));
        }
        match served.server.take() {
            None => Ok(()),
            Some(server) if force => {
                server.stop();
                Ok(())
            }
            Some(server) => server.stop_unless_connected().map_err(|server| {
                served.server = Some(server);
            }),
        }
    }

    fn status(
        &self,
        reg: &HashMap<u64, Served>,
        info: DeviceInfo,
        names: &HashMap<u64, String>,
    ) -> DeviceStatus {
        let served = reg.get(&info.id);
        let server = served.and_then(|s| s.server.as_ref());
        let name = user_name(&info);
        let export = self.nbd.mode(&name).filter(|m| *m != Mode::Hidden);
        DeviceStatus {
            nbd_uri: export.and_then(|_| self.nbd.uri(&name)),
            nbd_clients: self.nbd.clients(&name),
            export,
            name,
            parent: info
                .parent
                .map(|p| names.get(&p).cloned().unwrap_or_else(|| p.to_string())),
            socket: server
                .map(|srv| srv.path().display().to_string())
                .or_else(|| info.attrs.get(ATTR_SOCKET).cloned()),
            connected: server.is_some_and(|srv| srv.stats.connected.load(Ordering::SeqCst)),
            device: served.map(|s| s.device.clone()),
            info,
        }
    }

    /// Every device, origin first, with how it is served.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let devices = self.engine.devices();
        let names: HashMap<u64, String> = devices.iter().map(|d| (d.id, user_name(d))).collect();
        let reg = self.registry();
        devices
            .into_iter()
            .map(|d| self.status(&reg, d, &names))
            .collect()
    }

    /// Takes snapshot `name` of device `parent`; with `socket`, serves it there at once.
    /// Either all of it happens or nothing is left behind.
    pub fn create(
        &self,
        name: &str,
        parent: &str,
        writable: bool,
        socket: Option<&str>,
        serial: Option<&str>,
    ) -> Outcome<DeviceStatus> {
        check_name(name)?;
        if let Some(serial) = serial {
            check_serial(serial)?;
        }
        if let Some(sock) = socket {
            check_socket_path(sock)?;
        }
        let parent = self.find(parent)?;
        let mut reg = self.registry();
        // The snapshot and how it is served are durable in one commit: after a crash it is
        // there with its socket and serial, or not at all.
        let attrs: Vec<(&str, &str)> = [(ATTR_SERIAL, serial), (ATTR_SOCKET, socket)]
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)))
            .collect();
        let id = self
            .engine
            .create_snapshot_with(DeviceId(parent.id), name, writable, &attrs)?;
        let mut serve = || -> Outcome<()> {
            if let Some(sock) = socket {
                self.start_server(&mut reg, id, Path::new(sock))
                    .map_err(|source| DaemonError::Serve { source })?;
            }
            Ok(())
        };
        if let Err(f) = serve() {
            // Leave nothing half-made behind.
            reg.remove(&id.0);
            let _ = self.engine.delete_snapshot(id);
            return Err(f);
        }
        let adapter = self.adapter(&mut reg, id);
        self.nbd.set(name, id, adapter, Mode::ReadOnly);
        drop(reg);
        info!(
            "created {} snapshot {name} of {}",
            if writable { "writable" } else { "read-only" },
            parent.name
        );
        self.devices()
            .into_iter()
            .find(|d| d.info.id == id.0)
            .ok_or(DaemonError::Engine(CowError::NoDevice(id)))
    }

    /// Deletes snapshot `name`; refused while a VM is connected unless `force`.
    pub fn delete(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        if dev.id == DeviceId::ORIGIN.0 {
            return Err(DaemonError::Invalid("the origin cannot be deleted".into()));
        }
        let mut reg = self.registry();
        let hidden = self.hide_export(&dev.name, force, "delete")?;
        if self.stop_serving(&mut reg, dev.id, force).is_err() {
            if let Some(h) = hidden {
                self.nbd.reinstate(h);
            }
            return Err(DaemonError::Busy(format!(
                "a VM is connected to {name}; use --force to delete anyway"
            )));
        }
        if let Some(h) = &hidden {
            self.nbd.end(h);
        }
        reg.remove(&dev.id);
        if let Err(e) = self.engine.delete_snapshot(DeviceId(dev.id)) {
            if let Some(h) = hidden {
                self.nbd.reinstate(h);
            }
            return Err(e.into());
        }
        self.nbd.remove(&dev.name);
        info!("deleted snapshot {name}");
        Ok(())
    }

    /// Rolls the origin back to snapshot `name`. Unless forced, the origin stops accepting
    /// frontends and NBD clients while it changes (checked atomically with a connecting one,
    /// as for delete), and is served again after.
    pub fn restore(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        let mut reg = self.registry();
        let origin_socket = reg
            .get(&DeviceId::ORIGIN.0)
            .and_then(|s| s.server.as_ref())
            .map(|server| server.path().to_path_buf());
        let hidden = match force {
            true => None,
            false => self.hide_export(ORIGIN_NAME, false, "restore")?,
        };
        if !force
            && self
                .stop_serving(&mut reg, DeviceId::ORIGIN.0, false)
                .is_err()
        {
            if let Some(h) = hidden {
                self.nbd.reinstate(h);
            }
            return Err(DaemonError::Busy(
                "a VM is connected to the origin and would see its disk change underneath \
                 it; shut it down first or use --force"
                    .into(),
            ));
        }
        let restored = self.engine.restore(DeviceId(dev.id));
        if let Some(h) = hidden {
            self.nbd.reinstate(h);
        }
        if let (false, Some(socket)) = (force, origin_socket) {
            self.start_server(&mut reg, DeviceId::ORIGIN, &socket)
                .map_err(|source| DaemonError::ServeAgain { source })?;
        }
        restored?;
        info!("restored the origin to snapshot {name}");
        Ok(())
    }

    /// Serves device `name` on `socket`, and records it to be served there after a restart.
    pub fn serve(&self, name: &str, socket: &str) -> Outcome<()> {
        check_socket_path(socket)?;
        let dev = self.find(name)?;
        let mut reg = self.registry();
        if reg.get(&dev.id).is_some_and(|s| s.server.is_some()) {
            return Err(DaemonError::AlreadyServed(name.to_string()));
        }
        self.start_server(&mut reg, DeviceId(dev.id), Path::new(socket))
            .map_err(|source| DaemonError::Serve { source })?;
        if dev.id != DeviceId::ORIGIN.0 {
            self.engine
                .set_device_attr(DeviceId(dev.id), ATTR_SOCKET, Some(socket))?;
        }
        Ok(())
    }

    /// Stops serving device `name`; refused while a VM is connected unless `force`.
    pub fn unserve(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        let mut reg = self.registry();
        if reg.get(&dev.id).is_none_or(|s| s.server.is_none()) {
            return Err(DaemonError::NotServed(name.to_string()));
        }
        self.stop_serving(&mut reg, dev.id, force)
            .map_err(|()| DaemonError::Busy(format!("a VM is connected to {name}; use --force")))?;
        if dev.id != DeviceId::ORIGIN.0 {
            self.engine
                .set_device_attr(DeviceId(dev.id), ATTR_SOCKET, None)?;
        }
        Ok(())
    }
}

/// A snapshot name users can type and the engine can store.
fn check_name(name: &str) -> Outcome<()> {
    if name.is_empty() || name == ORIGIN_NAME || name.len() > MAX_NAME || name.contains(['/', '\0'])
    {
        return Err(DaemonError::Invalid(format!(
            "{name:?} is not a valid snapshot name (1-{MAX_NAME} characters, no '/', not \"{ORIGIN_NAME}\")"
        )));
    }
    Ok(())
}

/// A serial the guest can see whole: GET_ID returns 20 bytes.
fn check_serial(serial: &str) -> Outcome<()> {
    if serial.len() > crate::virtio_blk::ID_BYTES || serial.contains('\0') {
        return Err(DaemonError::Invalid(format!(
            "serial {serial:?} is longer than {} bytes",
            crate::virtio_blk::ID_BYTES
        )));
    }
    Ok(())
}

/// A path a unix socket can be bound at (sun_path holds 107 bytes and a NUL).
fn check_socket_path(path: &str) -> Outcome<()> {
    if path.is_empty() || path.len() > 107 || path.contains('\0') {
        return Err(DaemonError::Invalid(format!(
            "{path:?} cannot be a unix socket path (1-107 bytes)"
        )));
    }
    Ok(())
}

/// Where the cache object goes when `--cache` is not given: beside the origin.
pub fn default_cache_path(origin: &Path) -> PathBuf {
    let mut name = origin
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".cache");
    origin.with_file_name(name)
}
