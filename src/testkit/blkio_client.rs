//! A vhost-user-blk client: libblkio (the `blkio` crate), an implementation independent of
//! ours, with a buffer region it shares with the daemon. One request at a time per queue.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

/// Buffer space per queue in the shared region.
pub const QUEUE_BUF: usize = 4 << 20;

/// How long a request may take before the client calls it a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected client.
pub struct Client {
    pub blkio: blkio::Blkio,
    pub queues: Vec<blkio::Blkioq>,
    pub region: blkio::MemoryRegion,
}

impl Client {
    /// Connects to `socket` with `num_queues` queues.
    pub fn try_connect(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let path = socket
            .to_str()
            .ok_or_else(|| blkio::Error::new(blkio::Errno::INVAL, "socket path is not UTF-8"))?;
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path)?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", i32::try_from(num_queues).unwrap_or(i32::MAX))?;
        let started = b.start()?;
        let region = b.alloc_mem_region(QUEUE_BUF * num_queues)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            blkio: b,
            queues: started.queues,
            region,
        })
    }

    /// Connects read-write, panicking on failure.
    pub fn connect(socket: &Path, num_queues: usize) -> Client {
        Self::try_connect(socket, num_queues, false).expect("connect blkio client")
    }

    /// The device's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// Pointer to queue `q`'s buffer space.
    pub fn buf(&self, q: usize) -> *mut u8 {
        (self.region.addr + q * QUEUE_BUF) as *mut u8
    }

    /// Queue `q`'s buffer space, `len` bytes of it.
    pub fn buf_slice(&mut self, q: usize, len: usize) -> &mut [u8] {
        assert!(len <= QUEUE_BUF && q < self.queues.len());
        // SAFETY: the region is mapped for the life of the client and queue q's part is
        // QUEUE_BUF bytes long; no request on q is in flight while the slice is used (one
        // request at a time, and `&mut self`).
        unsafe { std::slice::from_raw_parts_mut(self.buf(q), len) }
    }

    /// Waits for one completion on queue `q` and returns its `ret` (0 or -errno).
    pub fn complete(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let mut timeout = REQUEST_TIMEOUT;
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "request did not complete within {REQUEST_TIMEOUT:?}");
        // SAFETY: do_io initialized the first `n` completions.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Waits up to `timeout` for one completion on queue `q`: its `ret`, or `None` if none
    /// came (the request is still in flight; call again to wait more).
    pub fn complete_within(&mut self, q: usize, timeout: Duration) -> Option<i32> {
        let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
        let mut timeout = timeout;
        match self.queues[q].do_io(&mut c, 1, Some(&mut timeout), None) {
            // SAFETY: do_io initialized the first completion.
            Ok(1) => Some(unsafe { c[0].assume_init_ref() }.ret),
            Ok(_) => None,
            Err(e) if e.errno() == blkio::Errno::TIME => None,
            Err(e) => panic!("do_io: {e}"),
        }
    }

    /// Largest buffer one request may carry (the device's size_max, as libblkio reports it).
    pub fn max_request(&self) -> usize {
        match self.blkio.get_i32("max-segment-len") {
            Ok(n) if n > 0 => (n as usize).min(QUEUE_BUF),
            _ => QUEUE_BUF,
        }
    }

    /// Writes `data` at `offset`, in requests of at most `max_request` bytes; returns the
    /// first non-zero `ret`, or 0.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        let step = self.max_request();
        for (i, part) in data.chunks(step).enumerate() {
            self.buf_slice(q, part.len()).copy_from_slice(part);
            let p = self.buf(q);
            self.queues[q].write(
                offset + (i * step) as u64,
                p,
                part.len(),
                0,
                blkio::ReqFlags::empty(),
            );
            let ret = self.complete(q);
            if ret != 0 {
                return ret;
            }
        }
        0
    }

    /// Reads `len` bytes at `offset`, in requests of at most `max_request` bytes.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let step = self.max_request();
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = step.min(len - done);
            let p = self.buf(q);
            self.queues[q].read(offset + done as u64, p, n, 0, blkio::ReqFlags::empty());
            match self.complete(q) {
                0 => out.extend_from_slice(self.buf_slice(q, n)),
                e => return Err(e),
            }
            done += n;
        }
        Ok(out)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, blkio::ReqFlags::empty());
        self.complete(q)
    }

    /// Discards a range.
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, blkio::ReqFlags::empty());
        self.complete(q)
    }

    /// Zeroes a range, allowing deallocation if `unmap`.
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            blkio::ReqFlags::empty()
        } else {
            blkio::ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, flags);
        self.complete(q)
    }
}
