//! The control plane's changes: snapshot create, delete and restore, and device attributes.
//! Each returns once its records are durable.

use super::engine::{stripe_of, CacheObject};
use super::error::{CowError, DeviceId, Result};
use super::format::{Record, INCOMPAT_SLOT_IDS};
use super::meta::{View, ORIGIN_ID};
use super::write::Src;
use crate::storage::AlignedBuf;
use std::sync::atomic::Ordering;

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
        self.create_snapshot_with(parent, name, writable, &[])
    }

    /// [`CacheObject::create_snapshot`] with attributes (`(key, value)`, e.g. the serial and
    /// the socket it is served on), all durable in one commit: their records are logged under
    /// one hold of the state lock, so one journal transaction (or checkpoint) holds them, and
    /// recovery applies a transaction whole or not at all. After a crash at any instant the
    /// snapshot is there with every attribute, or not at all.
    pub fn create_snapshot_with(
        &self,
        parent: DeviceId,
        name: &str,
        writable: bool,
        attrs: &[(&str, &str)],
    ) -> Result<DeviceId> {
        if name.is_empty() || name.len() > 255 {
            return Err(CowError::InvalidOption(
                "device name must be 1 to 255 bytes".into(),
            ));
        }
        self.check_journal_room()?;
        // New ids name a slot (`devids.rs`): the file says so before the first one.
        self.enable_incompat(INCOMPAT_SLOT_IDS, |_, _| {})?;
        // Origin writes bypassing the engine (direct I/O) finish first, and no more start
        // until the snapshot exists (then none may: `direct.rs`).
        let _gate = self.direct_gate.close();
        let (id, epoch) = {
            let mut st = self.write_state();
            Self::check_dev(&st.meta, parent.0)?;
            if st.meta.devs().any(|d| d.name == name) {
                return Err(CowError::NameInUse(name.to_string()));
            }
            let id = st.meta.new_device_id()?;
            let mut e = st.log(Record::CreateDevice {
                id,
                parent: parent.0,
                writable,
                name: name.to_string(),
            })?;
            for (key, value) in attrs {
                e = st.log(Record::SetAttr {
                    dev: id,
                    key: key.to_string(),
                    value: Some(value.to_string()),
                })?;
            }
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
            let epoch = st.log(Record::DeleteDevice { id: id.0 })?;
            self.fenced_pending.store(true, Ordering::Release);
            epoch
        };
        // Wait out requests that resolved a mapping of the deleted device before it went.
        self.stripe_barrier();
        self.commit(epoch, false)?;
        // Its blocks: free once durable, after another barrier (`State::log`).
        self.release_fenced();
        Ok(())
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
        if self.cor.is_some() {
            return Err(CowError::Origin(
                "restored: it is a read-only remote image (copied on read)",
            ));
        }
        let registry = self.registry.load_full();
        let side = Self::read_side(&registry, from.0)?;
        if side.size() != self.origin_size() {
            return Err(CowError::InvalidOption(format!(
                "the snapshot is {} bytes and the origin {}: resize the origin to the \
                 snapshot's size first",
                side.size(),
                self.origin_size()
            )));
        }
        let mut buf = AlignedBuf::zeroed(self.chunk_size as usize);
        for c in 0..self.origin_chunks() {
            let _stripe = self.write_stripe(stripe_of(c));
            Self::check_read_status(side, from.0)?;
            let view = self.view(side, c);
            let clen = self.chunk_len(c);
            match view {
                View::Origin => {}
                View::Zero => self.write_chunk_locked(ORIGIN_ID, c, 0, clen, Src::Zeroes)?,
                View::Block(b) => {
                    let io_len = self.cache_io_len(clen);
                    self.cache
                        .read_at(&mut buf[..io_len], self.block_offset(b))?;
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
        self.check_journal_room()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::{check_cache, OpenOptions};
    use crate::testkit::engine::mem_engine;
    use crate::testkit::storage::{CrashController, MemStorage};
    use std::sync::Arc;

    const ATTRS: [(&str, &str); 2] = [("socket", "/run/vm.sock"), ("serial", "VM-1")];

    /// Makes a cache object with `pre` attribute commits behind it (placing the journal),
    /// then creates "vm" with [`ATTRS`], crashing just before I/O event `crash_at` of the
    /// create (0: no crash). Returns the events the create took and the reopened object.
    fn create_and_crash(pre: u64, crash_at: u64) -> (u64, CacheObject, Result<DeviceId>) {
        let ctl = CrashController::new(pre * 1000 + crash_at, 0);
        let origin = ctl.store(vec![0; 16 * 4096]);
        let cache = ctl.store(Vec::new());
        let eng = mem_engine(16)
            .journal(16 << 10)
            .on(origin.clone(), cache.clone());
        let base = eng.create_snapshot(DeviceId::ORIGIN, "base", true).unwrap();
        for i in 0..pre {
            eng.set_device_attr(base, "n", Some(&i.to_string()))
                .unwrap();
        }
        let before = ctl.events();
        if crash_at > 0 {
            ctl.arm(crash_at);
        }
        let created = eng.create_snapshot_with(DeviceId::ORIGIN, "vm", true, &ATTRS);
        let used = ctl.events() - before;
        ctl.crash_now();
        let image = |s: &crate::testkit::storage::CrashStorage| {
            Arc::new(MemStorage::from_bytes(s.crash_image().unwrap()))
        };
        let (o, c) = (image(&origin), image(&cache));
        std::mem::forget(eng); // its closing flush would come after the crash
        let report = check_cache(&*c);
        assert!(
            report.is_clean(),
            "pre {pre}, crash at {crash_at}: {report}"
        );
        let reopened = CacheObject::open(o, c, OpenOptions::default()).unwrap();
        (used, reopened, created)
    }

    /// A snapshot and its attributes become durable in one commit: crashed at every I/O event
    /// of the create, with the journal at every position of a 16 KiB journal (plain appends,
    /// a wrap, a checkpoint), the reopened cache object has the snapshot with all its
    /// attributes, or no snapshot at all; and always once the create has returned.
    #[test]
    fn a_create_with_attributes_is_wholly_there_or_not_at_all() {
        let mut cases = 0;
        let mut absent = 0;
        for pre in 0..40 {
            let (used, ..) = create_and_crash(pre, 0);
            assert!(used >= 2, "a create syncs and writes");
            for crash_at in 1..=used + 1 {
                let (_, eng, created) = create_and_crash(pre, crash_at);
                let vm = eng.devices().into_iter().find(|d| d.name == "vm");
                match vm {
                    Some(d) => {
                        let want = ATTRS.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                        assert_eq!(
                            d.attrs,
                            want.collect(),
                            "pre {pre}, crash at {crash_at}: a half-made snapshot"
                        );
                    }
                    None => {
                        assert!(crash_at <= used, "pre {pre}: a returned create was lost");
                        absent += 1;
                    }
                }
                assert!(created.is_ok() || crash_at <= used);
                cases += 1;
            }
        }
        assert!(
            absent > 0 && absent < cases,
            "{absent} of {cases} crashes lost it"
        );
    }
}
