//! virtio-blk requests: layout, parsing and validation, transport-independent.
//!
//! Nothing here knows about vhost-user. [`Request::parse`] takes the descriptors of one chain
//! (already bounds-checked for the ring itself by `virtio-queue`) and the guest memory, and
//! either yields a request whose every field has been checked against the device geometry, or
//! a [`ParseError`] that says which virtio status to answer with. Guest input is hostile: every
//! length, direction, sector and address is validated here, before any I/O happens.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64};

/// Sectors are always 512 bytes in virtio-blk, whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Size of a virtio-blk sector in bytes.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the GET_ID answer (no terminating NUL if the serial fills it).
pub const ID_BYTES: usize = 20;

/// Request types (virtio spec 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status values written in the last byte of a request.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The UNMAP flag of a write-zeroes range: the device may deallocate.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Device size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512 or 4096); I/O must be aligned to it.
    pub logical_block_size: u32,
    /// Largest single data descriptor in bytes (SIZE_MAX).
    pub size_max: u32,
    /// Most data descriptors per request (SEG_MAX).
    pub seg_max: u32,
    /// Most sectors per discard range.
    pub max_discard_sectors: u32,
    /// Most ranges per discard request.
    pub max_discard_seg: u32,
    /// Most sectors per write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Most ranges per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Device is read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

impl Limits {
    /// Sensible limits for a device of `capacity_bytes`.
    pub fn new(
        capacity_bytes: u64,
        logical_block_size: u32,
        read_only: bool,
        seg_max: u32,
    ) -> Self {
        let lbs = u64::from(logical_block_size);
        let capacity_sectors = (capacity_bytes / lbs) * lbs / SECTOR_SIZE;
        Limits {
            capacity_sectors,
            logical_block_size,
            size_max: 1 << 20,
            seg_max,
            // 1 GiB per range, aligned down to the logical block size.
            max_discard_sectors: (1 << 21) & !((logical_block_size >> SECTOR_SHIFT) - 1),
            max_discard_seg: 32,
            max_write_zeroes_sectors: (1 << 21) & !((logical_block_size >> SECTOR_SHIFT) - 1),
            max_write_zeroes_seg: 32,
            read_only,
        }
    }

    fn sectors_per_block(&self) -> u64 {
        u64::from(self.logical_block_size) >> SECTOR_SHIFT
    }
}

/// The 16-byte request header (struct virtio_blk_outhdr).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RequestHeader {
    pub request_type: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: plain-old-data made of little-endian integers, no padding, any bit pattern valid.
unsafe impl ByteValued for RequestHeader {}

/// One range of a discard or write-zeroes request (struct virtio_blk_discard_write_zeroes).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct DiscardRange {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}

// SAFETY: plain-old-data made of little-endian integers, no padding, any bit pattern valid.
unsafe impl ByteValued for DiscardRange {}

const RANGE_BYTES: u32 = std::mem::size_of::<DiscardRange>() as u32;

/// A validated range of a discard or write-zeroes request, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
    /// For write-zeroes: the driver allows deallocation.
    pub unmap: bool,
}

/// One guest buffer of a read or write, in guest-physical terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What a validated request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `Request::data_len` bytes at `offset` into the segments.
    Read {
        offset: u64,
    },
    /// Write the segments at `offset`.
    Write {
        offset: u64,
    },
    Flush,
    /// Copy the serial into the (single) segment.
    GetId,
    /// Deallocate the ranges (in `Request::ranges`).
    Discard,
    /// Zero the ranges (in `Request::ranges`).
    WriteZeroes,
}

/// Why a chain was refused, and so which status it gets.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain has no status descriptor")]
    NoStatus,
    #[error("status descriptor is not device-writable or is empty")]
    BadStatusDescriptor,
    #[error("request header is missing, short or device-writable")]
    BadHeader,
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data descriptor has the wrong direction")]
    WrongDirection,
    #[error("request has {0} data descriptors, more than seg_max")]
    TooManySegments(usize),
    #[error("data descriptor of {0} bytes exceeds size_max")]
    SegmentTooLarge(u32),
    #[error("data length {0} is not a multiple of the logical block size")]
    Misaligned(u64),
    #[error("sector {sector} + {sectors} sectors lies beyond the end of the device")]
    OutOfRange { sector: u64, sectors: u64 },
    #[error("write-type request on a read-only device")]
    ReadOnly,
    #[error("discard/write-zeroes payload is malformed")]
    BadRanges,
    #[error("discard/write-zeroes range has reserved flags set")]
    BadRangeFlags,
    #[error("request has no data buffer")]
    NoData,
}

impl ParseError {
    /// The virtio status this error is answered with.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::Unsupported(_) | ParseError::BadRangeFlags => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Where to write the status byte: the last byte of the chain's last descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusSlot {
    pub addr: GuestAddress,
}

/// A request whose every field has been validated. Reused across requests (no allocation per
/// request once the vectors have grown to the queue's largest request).
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    /// Read/write/GET_ID data buffers in order.
    pub segments: Vec<Segment>,
    /// Sum of `segments` lengths.
    pub data_len: u64,
    /// Discard/write-zeroes ranges.
    pub ranges: Vec<ByteRange>,
    /// Where the status byte goes.
    pub status: StatusSlot,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            kind: RequestKind::Flush,
            segments: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status: StatusSlot {
                addr: GuestAddress(0),
            },
        }
    }
}

/// Finds the status slot of a chain: the last descriptor, device-writable and non-empty.
/// The status goes in its last byte. An error means there is nowhere to report a status.
pub fn find_status<I>(descriptors: I) -> Result<StatusSlot, ParseError>
where
    I: Iterator<Item = Descriptor>,
{
    let last = descriptors.last().ok_or(ParseError::NoStatus)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::BadStatusDescriptor);
    }
    let addr = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ParseError::BadStatusDescriptor)?;
    Ok(StatusSlot {
        addr: GuestAddress(addr),
    })
}

impl Request {
    /// Parses one descriptor chain into `self`, validating it against `limits`.
    ///
    /// `descriptors` must yield the whole chain in order (the caller's `DescriptorChain`
    /// iterator, which follows indirect tables and bounds the chain length). On error, the
    /// status slot is still filled in when the chain has one, so the caller can answer.
    pub fn parse<I, M>(
        &mut self,
        descriptors: I,
        mem: &M,
        limits: &Limits,
    ) -> Result<(), ParseError>
    where
        I: Iterator<Item = Descriptor> + Clone,
        M: GuestMemory,
    {
        self.segments.clear();
        self.ranges.clear();
        self.data_len = 0;
        self.status = find_status(descriptors.clone())?;

        let mut descs = descriptors;
        let header_desc = descs.next().ok_or(ParseError::BadHeader)?;
        if header_desc.is_write_only()
            || (header_desc.len() as usize) < std::mem::size_of::<RequestHeader>()
        {
            return Err(ParseError::BadHeader);
        }
        let header: RequestHeader = mem
            .read_obj(header_desc.addr())
            .map_err(|_| ParseError::Memory(header_desc.addr().0))?;
        let request_type = header.request_type.to_native();
        let sector = header.sector.to_native();

        // Everything between the header and the status descriptor is data. The status
        // descriptor is the last one; we know the chain has at least two descriptors unless
        // the header is also the status (impossible: the header is device-readable).
        let mut count = 0usize;
        let mut pending_last: Option<Descriptor> = None;
        let mut want_write_only = None;
        let mut is_range_request = false;
        match request_type {
            VIRTIO_BLK_T_IN => want_write_only = Some(true),
            VIRTIO_BLK_T_OUT => want_write_only = Some(false),
            VIRTIO_BLK_T_GET_ID => want_write_only = Some(true),
            VIRTIO_BLK_T_FLUSH => {}
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                want_write_only = Some(false);
                is_range_request = true;
            }
            other => return Err(ParseError::Unsupported(other)),
        }
        if limits.read_only
            && matches!(
                request_type,
                VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
            )
        {
            return Err(ParseError::ReadOnly);
        }

        // Walk the data descriptors: all but the last (status) descriptor after the header.
        for desc in descs {
            if let Some(prev) = pending_last.replace(desc) {
                count += 1;
                self.add_data(prev, want_write_only, limits, count)?;
            }
        }
        if pending_last.is_none() {
            // The header was the last descriptor: find_status would have refused a
            // device-readable header, so this is unreachable, but stay defensive.
            return Err(ParseError::NoStatus);
        }

        match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let block = u64::from(limits.logical_block_size);
                if !self.data_len.is_multiple_of(block)
                    || !sector.is_multiple_of(limits.sectors_per_block())
                {
                    return Err(ParseError::Misaligned(self.data_len));
                }
                let sectors = self.data_len >> SECTOR_SHIFT;
                check_range(sector, sectors, limits)?;
                let offset = sector << SECTOR_SHIFT;
                self.kind = if request_type == VIRTIO_BLK_T_IN {
                    RequestKind::Read { offset }
                } else {
                    RequestKind::Write { offset }
                };
            }
            VIRTIO_BLK_T_FLUSH => self.kind = RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => {
                if self.data_len == 0 {
                    return Err(ParseError::NoData);
                }
                self.kind = RequestKind::GetId;
            }
            _ => {
                debug_assert!(is_range_request);
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                self.parse_ranges(mem, limits, discard)?;
                self.kind = if discard {
                    RequestKind::Discard
                } else {
                    RequestKind::WriteZeroes
                };
            }
        }
        Ok(())
    }

    fn add_data(
        &mut self,
        desc: Descriptor,
        want_write_only: Option<bool>,
        limits: &Limits,
        count: usize,
    ) -> Result<(), ParseError> {
        if desc.len() == 0 {
            return Ok(());
        }
        match want_write_only {
            // Flush carries no data; ignore stray buffers like QEMU does.
            None => return Ok(()),
            Some(w) if w != desc.is_write_only() => return Err(ParseError::WrongDirection),
            Some(_) => {}
        }
        if count > limits.seg_max as usize {
            return Err(ParseError::TooManySegments(count));
        }
        if desc.len() > limits.size_max {
            return Err(ParseError::SegmentTooLarge(desc.len()));
        }
        self.segments.push(Segment {
            addr: desc.addr(),
            len: desc.len(),
        });
        self.data_len += u64::from(desc.len());
        Ok(())
    }

    fn parse_ranges<M: GuestMemory>(
        &mut self,
        mem: &M,
        limits: &Limits,
        discard: bool,
    ) -> Result<(), ParseError> {
        if self.data_len == 0 || !self.data_len.is_multiple_of(u64::from(RANGE_BYTES)) {
            return Err(ParseError::BadRanges);
        }
        let (max_seg, max_sectors) = if discard {
            (limits.max_discard_seg, limits.max_discard_sectors)
        } else {
            (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
        };
        if self.data_len / u64::from(RANGE_BYTES) > u64::from(max_seg) {
            return Err(ParseError::BadRanges);
        }
        for i in 0..self.segments.len() {
            let seg = self.segments[i];
            if !seg.len.is_multiple_of(RANGE_BYTES) {
                return Err(ParseError::BadRanges);
            }
            for k in 0..(seg.len / RANGE_BYTES) {
                let addr = GuestAddress(seg.addr.0 + u64::from(k * RANGE_BYTES));
                let r: DiscardRange = mem.read_obj(addr).map_err(|_| ParseError::Memory(addr.0))?;
                let sector = r.sector.to_native();
                let num = r.num_sectors.to_native();
                let flags = r.flags.to_native();
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(ParseError::BadRangeFlags);
                }
                if num > max_sectors {
                    return Err(ParseError::BadRanges);
                }
                let spb = limits.sectors_per_block();
                if !sector.is_multiple_of(spb) || u64::from(num) % spb != 0 {
                    return Err(ParseError::Misaligned(u64::from(num) << SECTOR_SHIFT));
                }
                check_range(sector, u64::from(num), limits)?;
                self.ranges.push(ByteRange {
                    offset: sector << SECTOR_SHIFT,
                    len: u64::from(num) << SECTOR_SHIFT,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
        }
        Ok(())
    }
}

fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), ParseError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(ParseError::OutOfRange { sector, sectors }),
    }
}

/// Builds the GET_ID answer: the serial, truncated or NUL-padded to 20 bytes.
pub fn id_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    id
}

/// virtio-blk feature bits (virtio spec 5.2.3).
pub mod features {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
    pub const RING_INDIRECT_DESC: u32 = 28;
    pub const RING_EVENT_IDX: u32 = 29;
    pub const VERSION_1: u32 = 32;
}

/// Byte offsets of struct virtio_blk_config fields (virtio spec 5.2.4).
pub mod config_offsets {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const ALIGNMENT_OFFSET: usize = 25;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Size of the whole struct including the secure-erase and zoned parts we leave zero.
    pub const SIZE: usize = 96;
}

/// Lays out the config space for a device with these limits.
pub fn config_space(
    limits: &Limits,
    num_queues: u16,
    writeback: bool,
    physical_block_size: u32,
) -> [u8; config_offsets::SIZE] {
    use config_offsets::*;
    let mut c = [0u8; SIZE];
    let put32 =
        |c: &mut [u8; SIZE], off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    c[CAPACITY..CAPACITY + 8].copy_from_slice(&limits.capacity_sectors.to_le_bytes());
    put32(&mut c, SIZE_MAX, limits.size_max);
    put32(&mut c, SEG_MAX, limits.seg_max);
    put32(&mut c, BLK_SIZE, limits.logical_block_size);
    let exp = (physical_block_size / limits.logical_block_size)
        .max(1)
        .trailing_zeros();
    c[PHYSICAL_BLOCK_EXP] = exp as u8;
    c[ALIGNMENT_OFFSET] = 0;
    let min_io = (limits.logical_block_size >> SECTOR_SHIFT).max(1) as u16;
    c[MIN_IO_SIZE..MIN_IO_SIZE + 2].copy_from_slice(&min_io.to_le_bytes());
    put32(&mut c, OPT_IO_SIZE, 0);
    c[WRITEBACK] = u8::from(writeback);
    c[NUM_QUEUES..NUM_QUEUES + 2].copy_from_slice(&num_queues.to_le_bytes());
    put32(&mut c, MAX_DISCARD_SECTORS, limits.max_discard_sectors);
    put32(&mut c, MAX_DISCARD_SEG, limits.max_discard_seg);
    put32(
        &mut c,
        DISCARD_SECTOR_ALIGNMENT,
        limits.logical_block_size >> SECTOR_SHIFT,
    );
    put32(
        &mut c,
        MAX_WRITE_ZEROES_SECTORS,
        limits.max_write_zeroes_sectors,
    );
    put32(&mut c, MAX_WRITE_ZEROES_SEG, limits.max_write_zeroes_seg);
    c[WRITE_ZEROES_MAY_UNMAP] = 1;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits::new(1 << 20, 512, false, 8)
    }

    fn d(addr: u64, len: u32, write: bool) -> Descriptor {
        let mut flags = VRING_DESC_F_NEXT as u16;
        if write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) -> Descriptor {
        let h = RequestHeader {
            request_type: t.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        m.write_obj(h, GuestAddress(at)).unwrap();
        d(at, 16, false)
    }

    fn parse(m: &GuestMemoryMmap, descs: &[Descriptor], l: &Limits) -> Result<Request, ParseError> {
        let mut r = Request::default();
        r.parse(descs.iter().copied(), m, l).map(|_| r)
    }

    #[test]
    fn read_request() {
        let m = mem();
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            d(0x1000, 4096, true),
            d(0x3000, 1, true),
        ];
        let r = parse(&m, &descs, &limits()).unwrap();
        assert_eq!(r.kind, RequestKind::Read { offset: 4096 });
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.status.addr, GuestAddress(0x3000));
    }

    #[test]
    fn status_is_last_byte_of_last_descriptor() {
        let m = mem();
        let descs = [header(&m, 0, VIRTIO_BLK_T_FLUSH, 0), d(0x3000, 4, true)];
        let r = parse(&m, &descs, &limits()).unwrap();
        assert_eq!(r.kind, RequestKind::Flush);
        assert_eq!(r.status.addr, GuestAddress(0x3003));
    }

    #[test]
    fn malformed_chains_are_refused() {
        let m = mem();
        let l = limits();
        // Each case gets its own header slot: all cases are built before any is parsed.
        let slot = std::cell::Cell::new(0x8000u64);
        let h = |t, s| {
            slot.set(slot.get() + 0x100);
            header(&m, slot.get(), t, s)
        };
        let st = d(0x3000, 1, true);
        let cases: Vec<(Vec<Descriptor>, ParseError)> = vec![
            (vec![], ParseError::NoStatus),
            (vec![h(VIRTIO_BLK_T_IN, 0)], ParseError::BadStatusDescriptor),
            (
                vec![
                    h(VIRTIO_BLK_T_IN, 0),
                    d(0x1000, 512, true),
                    d(0x3000, 1, false),
                ],
                ParseError::BadStatusDescriptor,
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(0x3000, 0, true)],
                ParseError::BadStatusDescriptor,
            ),
            (vec![d(0, 8, false), st], ParseError::BadHeader),
            (vec![d(0, 16, true), st], ParseError::BadHeader),
            (vec![d(MEM - 8, 16, false), st], ParseError::Memory(MEM - 8)),
            (vec![h(99, 0), st], ParseError::Unsupported(99)),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(0x1000, 512, false), st],
                ParseError::WrongDirection,
            ),
            (
                vec![h(VIRTIO_BLK_T_OUT, 0), d(0x1000, 512, true), st],
                ParseError::WrongDirection,
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(0x1000, 100, true), st],
                ParseError::Misaligned(100),
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 2047), d(0x1000, 1024, true), st],
                ParseError::OutOfRange {
                    sector: 2047,
                    sectors: 2,
                },
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, u64::MAX), d(0x1000, 512, true), st],
                ParseError::OutOfRange {
                    sector: u64::MAX,
                    sectors: 1,
                },
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), d(0x1000, (1 << 20) + 512, true), st],
                ParseError::SegmentTooLarge((1 << 20) + 512),
            ),
            (vec![h(VIRTIO_BLK_T_GET_ID, 0), st], ParseError::NoData),
            (
                vec![h(VIRTIO_BLK_T_DISCARD, 0), d(0x1000, 15, false), st],
                ParseError::BadRanges,
            ),
        ];
        for (descs, want) in cases {
            assert_eq!(parse(&m, &descs, &l).err(), Some(want.clone()), "{descs:?}");
        }
        let mut many = vec![h(VIRTIO_BLK_T_IN, 0)];
        many.extend((0..9).map(|i| d(0x1000 + i * 512, 512, true)));
        many.push(st);
        assert_eq!(
            parse(&m, &many, &l).err(),
            Some(ParseError::TooManySegments(9))
        );
    }

    #[test]
    fn read_only_refuses_writes_discards_and_zeroes() {
        let m = mem();
        let mut l = limits();
        l.read_only = true;
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            let descs = [
                header(&m, 0, t, 0),
                d(0x1000, 512, false),
                d(0x3000, 1, true),
            ];
            assert_eq!(parse(&m, &descs, &l).err(), Some(ParseError::ReadOnly));
        }
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_IN, 0),
            d(0x1000, 512, true),
            d(0x3000, 1, true),
        ];
        assert!(parse(&m, &descs, &l).is_ok());
    }

    fn range(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
        let r = DiscardRange {
            sector: sector.into(),
            num_sectors: num.into(),
            flags: flags.into(),
        };
        m.write_obj(r, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let m = mem();
        let l = limits();
        range(&m, 0x1000, 8, 16, 0);
        range(&m, 0x1010, 100, 4, 0);
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            d(0x1000, 32, false),
            d(0x3000, 1, true),
        ];
        let r = parse(&m, &descs, &l).unwrap();
        assert_eq!(r.kind, RequestKind::Discard);
        assert_eq!(
            r.ranges,
            vec![
                ByteRange {
                    offset: 4096,
                    len: 8192,
                    unmap: false
                },
                ByteRange {
                    offset: 51200,
                    len: 2048,
                    unmap: false
                }
            ]
        );
        // UNMAP is allowed only on write-zeroes.
        range(&m, 0x1000, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_DISCARD, 0),
            d(0x1000, 16, false),
            d(0x3000, 1, true),
        ];
        assert_eq!(parse(&m, &descs, &l).err(), Some(ParseError::BadRangeFlags));
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            d(0x1000, 16, false),
            d(0x3000, 1, true),
        ];
        let r = parse(&m, &descs, &l).unwrap();
        assert!(r.ranges[0].unmap);
        // A range past the end.
        range(&m, 0x1000, 2040, 16, 0);
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            d(0x1000, 16, false),
            d(0x3000, 1, true),
        ];
        assert_eq!(
            parse(&m, &descs, &l).err(),
            Some(ParseError::OutOfRange {
                sector: 2040,
                sectors: 16
            })
        );
    }

    #[test]
    fn logical_block_size_alignment() {
        let m = mem();
        let l = Limits::new(1 << 20, 4096, false, 8);
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_IN, 1),
            d(0x1000, 4096, true),
            d(0x3000, 1, true),
        ];
        assert!(matches!(
            parse(&m, &descs, &l),
            Err(ParseError::Misaligned(_))
        ));
        let descs = [
            header(&m, 0, VIRTIO_BLK_T_IN, 8),
            d(0x1000, 4096, true),
            d(0x3000, 1, true),
        ];
        assert!(parse(&m, &descs, &l).is_ok());
    }

    #[test]
    fn config_space_layout() {
        let l = Limits::new(1 << 30, 4096, false, 126);
        let c = config_space(&l, 2, true, 4096);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn serial_is_padded_or_truncated() {
        assert_eq!(&id_bytes("abc")[..4], b"abc\0");
        assert_eq!(
            &id_bytes("0123456789abcdefghijXYZ"),
            b"0123456789abcdefghij"
        );
    }

    proptest! {
        /// Whatever a guest puts in a chain, parsing never panics, and anything accepted
        /// lies inside the device and inside guest memory.
        #[test]
        fn arbitrary_chains_never_escape(
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..2100, any::<u64>()],
            descs in proptest::collection::vec((0u64..MEM + 0x1000, 0u32..0x2_0000, any::<bool>()), 0..12),
            ro in any::<bool>(),
        ) {
            let m = mem();
            let mut l = limits();
            l.read_only = ro;
            let mut chain = vec![header(&m, 0, t, sector)];
            chain.extend(descs.iter().map(|&(a, n, w)| d(a, n, w)));
            if let Ok(r) = parse(&m, &chain, &l) {
                match r.kind {
                    RequestKind::Read { offset } | RequestKind::Write { offset } => {
                        prop_assert!(offset + r.data_len <= l.capacity_sectors * 512);
                        prop_assert_eq!(r.data_len % 512, 0);
                        prop_assert!(r.segments.len() <= l.seg_max as usize);
                        let is_read = matches!(r.kind, RequestKind::Read { .. });
                        prop_assert!(!ro || is_read);
                    }
                    RequestKind::Discard | RequestKind::WriteZeroes => {
                        prop_assert!(!ro);
                        for rg in &r.ranges {
                            prop_assert!(rg.offset + rg.len <= l.capacity_sectors * 512);
                        }
                    }
                    RequestKind::Flush | RequestKind::GetId => {}
                }
                prop_assert_eq!(r.segments.iter().map(|s| u64::from(s.len)).sum::<u64>(), r.data_len);
            }
        }
    }
}
