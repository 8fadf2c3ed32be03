//! The control plane's changes: snapshot create, delete and restore, and device attributes.
//! Each returns once its records are durable.

use super::engine::CacheObject;
use super::error::{CowError, DeviceId, Result};
use super::format::Record;
use super::meta::{View, ORIGIN_ID};
use super::write::Src;
use std::sync::PoisonError;

impl CacheObject {
    /// Creates a snapshot of `parent` (the origin or any snapshot) in O(1): a table sharing the
    /// parent's pages and a link. Returns once the new device record is durable. It does not
    /// flush the origin: like the parent, the snapshot holds the parent's writes not yet flushed
    /// at creation only as durably as the parent does (a crash may drop any of them from both).
    /// Call [`CacheObject::flush`] first for a fully durable point-in-time copy.
    pub fn create_snapshot(
        &self,
        parent: DeviceId,
        name: &str,
        writable: bool,
    ) -> Result<DeviceId> {
        if name.is_empty() || name.len() > 255 {
            return Err(CowError::InvalidOption(
                "device name must be 1 to 255 bytes".into(),
            ));
        }
        let (id, epoch) = {
            let mut st = self.write_state();
            Self::check_dev(&st.meta, parent.0)?;
            if st.meta.devices.iter().flatten().any(|d| d.name == name) {
                return Err(CowError::NameInUse(name.to_string()));
            }
            let id = st.meta.next_id;
            let e = st.log(Record::CreateDevice {
                id,
                parent: parent.0,
                writable,
                name: name.to_string(),
            })?;
            (id, e)
        };
        self.commit(epoch, false)?;
        Ok(DeviceId(id))
    }

    /// Deletes a snapshot, copying no data: each of its blocks passes to its children that are
    /// unmapped there, or is freed once the deletion is durable. Its children move up to its
    /// parent. Time is proportional to the chunks it maps.
    pub fn delete_snapshot(&self, id: DeviceId) -> Result<()> {
        if id == DeviceId::ORIGIN {
            return Err(CowError::Origin("deleted"));
        }
        let epoch = {
            let mut st = self.write_state();
            if st.meta.dev(id.0).is_none() {
                return Err(CowError::NoDevice(id));
            }
            st.log(Record::DeleteDevice { id: id.0 })?
        };
        // Wait out requests that resolved a mapping of the deleted device before it went.
        for s in self.stripes.iter() {
            drop(s.write().unwrap_or_else(PoisonError::into_inner));
        }
        self.commit(epoch, false)
    }

    /// Rolls the origin back to snapshot `from`: every chunk where `from` does not read through
    /// to the origin is written into the origin (with the usual copy-out for the origin's other
    /// snapshots). Cost: one chunk read and write per chunk `from` (or an ancestor below the
    /// origin) maps, plus a metadata walk over all chunks. `from` and every other device keep
    /// their views. Flushes at the end.
    pub fn restore(&self, from: DeviceId) -> Result<()> {
        if from == DeviceId::ORIGIN {
            return Err(CowError::Origin("restored from itself"));
        }
        let registry = self.registry.load_full();
        let side = Self::read_side(&registry, from.0)?;
        let mut buf = vec![0u8; self.chunk_size as usize];
        for c in 0..self.nchunks {
            let _stripe = self
                .stripe(c)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            Self::check_read_status(side, from.0)?;
            let view = self.view(side, c);
            let clen = self.chunk_len(c);
            match view {
                View::Origin => {}
                View::Zero => self.write_chunk_locked(ORIGIN_ID, c, 0, clen, Src::Zeroes)?,
                View::Block(b) => {
                    self.cache.read_at(&mut buf[..clen], self.block_offset(b))?;
                    // Made inoperative meanwhile (under another stripe), `from` may have lost
                    // that block to another user: never copy such data into the origin.
                    Self::check_read_status(side, from.0)?;
                    self.write_chunk_locked(ORIGIN_ID, c, 0, clen, Src::Data(&buf[..clen]))?;
                }
            }
        }
        self.flush()
    }

    /// Sets (or with `None` removes) a persistent attribute of a device (e.g. its serial or
    /// the socket it is served on). Durable on return.
    pub fn set_device_attr(&self, dev: DeviceId, key: &str, value: Option<&str>) -> Result<()> {
        let epoch = {
            let mut st = self.write_state();
            if st.meta.dev(dev.0).is_none() {
                return Err(CowError::NoDevice(dev));
            }
            st.log(Record::SetAttr {
                dev: dev.0,
                key: key.to_string(),
                value: value.map(str::to_string),
            })?
        };
        self.commit(epoch, false)
    }
}
