//! virtio-blk requests: layout, parsing and validation, transport-independent.
//!
//! Nothing here knows about vhost-user. [`Request::parse`] takes the descriptors of one chain
//! (already bounds-checked for the ring itself by `virtio-queue`) and the guest memory, and
//! either yields a request whose every field has been checked against the device geometry, or
//! a [`ParseError`] that says which virtio status to answer with. Guest input is hostile: every
//! length, direction, sector and address is validated here, before any I/O happens.

use std::mem::{offset_of, size_of};
use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    self as spec, virtio_blk_config, virtio_blk_discard_write_zeroes, virtio_blk_outhdr,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

pub use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Sectors are always 512 bytes in virtio-blk, whatever the logical block size.
pub use crate::storage::SECTOR_SIZE;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = SECTOR_SIZE.trailing_zeros();
/// Length of the GET_ID answer (no terminating NUL if the serial fills it).
pub const ID_BYTES: usize = spec::VIRTIO_BLK_ID_BYTES as usize;

/// Status values written in the last byte of a request, as the byte they are written as.
pub const VIRTIO_BLK_S_OK: u8 = spec::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = spec::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = spec::VIRTIO_BLK_S_UNSUPP as u8;

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
    /// These limits for a device of `capacity_bytes` (resized since they were made).
    pub fn with_capacity(mut self, capacity_bytes: u64) -> Self {
        let lbs = u64::from(self.logical_block_size);
        self.capacity_sectors = (capacity_bytes / lbs) * lbs / SECTOR_SIZE;
        self
    }

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

/// The 16-byte request header, `struct virtio_blk_outhdr`, as the driver wrote it.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct RequestHeader(virtio_blk_outhdr);

// SAFETY: `virtio_blk_outhdr` is repr(C) with two u32 and a u64 (16 bytes, no padding: the
// bindings assert its layout), so any bit pattern is a valid value; repr(transparent) gives
// the newtype that same layout.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    /// A header as a driver lays it out (little-endian).
    pub fn new(request_type: u32, sector: u64) -> Self {
        RequestHeader(virtio_blk_outhdr {
            type_: request_type.to_le(),
            ioprio: 0,
            sector: sector.to_le(),
        })
    }

    pub fn request_type(&self) -> u32 {
        u32::from_le(self.0.type_)
    }

    pub fn sector(&self) -> u64 {
        u64::from_le(self.0.sector)
    }
}

/// One range of a discard or write-zeroes request, `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct DiscardRange(virtio_blk_discard_write_zeroes);

// SAFETY: `virtio_blk_discard_write_zeroes` is repr(C) with a u64 and two u32 (16 bytes, no
// padding: the bindings assert its layout), so any bit pattern is a valid value;
// repr(transparent) gives the newtype that same layout.
unsafe impl ByteValued for DiscardRange {}

impl DiscardRange {
    /// A range as a driver lays it out (little-endian).
    pub fn new(sector: u64, num_sectors: u32, flags: u32) -> Self {
        DiscardRange(virtio_blk_discard_write_zeroes {
            sector: sector.to_le(),
            num_sectors: num_sectors.to_le(),
            flags: flags.to_le(),
        })
    }

    pub fn sector(&self) -> u64 {
        u64::from_le(self.0.sector)
    }

    pub fn num_sectors(&self) -> u32 {
        u32::from_le(self.0.num_sectors)
    }

    pub fn flags(&self) -> u32 {
        u32::from_le(self.0.flags)
    }
}

const RANGE_BYTES: u32 = size_of::<DiscardRange>() as u32;

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
    /// The chain ended on a descriptor that still points to a next one: a loop, a next index
    /// past the ring, or a descriptor or indirect table that cannot be read or is malformed
    /// (virtio-queue's chain iterator stops there without saying why).
    #[error("descriptor chain is broken (a loop, or a bad next index or indirect table)")]
    BrokenChain,
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
pub struct StatusAddr {
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
    pub status: StatusAddr,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            kind: RequestKind::Flush,
            segments: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status: StatusAddr {
                addr: GuestAddress(0),
            },
        }
    }
}

/// Finds the status byte of a chain: the last descriptor, device-writable and non-empty.
/// The status goes in its last byte. An error means there is nowhere to report a status.
/// Also says whether the chain ended properly: a last descriptor that still has a next one
/// means the iterator stopped on a broken chain (the status found is then the last byte of a
/// device-writable buffer of the chain, where an error may still be reported).
pub fn find_status<I>(descriptors: I) -> Result<(StatusAddr, bool), ParseError>
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
    let status = StatusAddr {
        addr: GuestAddress(addr),
    };
    Ok((status, !last.has_next()))
}

impl Request {
    /// Parses one descriptor chain into `self`, validating it against `limits`.
    ///
    /// `descriptors` must yield the whole chain in order (the caller's `DescriptorChain`
    /// iterator, which follows indirect tables and bounds the chain length). On error, the
    /// status address is still filled in when the chain has one, so the caller can answer.
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
        let (status, complete) = find_status(descriptors.clone())?;
        self.status = status;
        if !complete {
            return Err(ParseError::BrokenChain);
        }

        let mut descs = descriptors;
        let header_desc = descs.next().ok_or(ParseError::BadHeader)?;
        if header_desc.is_write_only() || (header_desc.len() as usize) < size_of::<RequestHeader>()
        {
            return Err(ParseError::BadHeader);
        }
        let header: RequestHeader = mem
            .read_obj(header_desc.addr())
            .map_err(|_| ParseError::Memory(header_desc.addr().0))?;
        let request_type = header.request_type();
        let want_write_only = data_direction(request_type, limits)?;

        // Everything between the header and the status descriptor is data. The status
        // descriptor is the last one; we know the chain has at least two descriptors unless
        // the header is also the status (impossible: the header is device-readable).
        let mut count = 0usize;
        let mut pending_last: Option<Descriptor> = None;
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
        self.kind = self.validate(request_type, header.sector(), mem, limits)?;
        Ok(())
    }

    /// Checks the data gathered for a request of `request_type` at `sector`, reading the
    /// ranges of a discard or write-zeroes; returns what it asks for.
    fn validate<M: GuestMemory>(
        &mut self,
        request_type: u32,
        sector: u64,
        mem: &M,
        limits: &Limits,
    ) -> Result<RequestKind, ParseError> {
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
                Ok(if request_type == VIRTIO_BLK_T_IN {
                    RequestKind::Read { offset }
                } else {
                    RequestKind::Write { offset }
                })
            }
            VIRTIO_BLK_T_FLUSH => Ok(RequestKind::Flush),
            VIRTIO_BLK_T_GET_ID if self.data_len == 0 => Err(ParseError::NoData),
            VIRTIO_BLK_T_GET_ID => Ok(RequestKind::GetId),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                self.parse_ranges(mem, limits, discard)?;
                Ok(if discard {
                    RequestKind::Discard
                } else {
                    RequestKind::WriteZeroes
                })
            }
            // `data_direction` refused every other type before the data was gathered.
            other => Err(ParseError::Unsupported(other)),
        }
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
                let (sector, num, flags) = (r.sector(), r.num_sectors(), r.flags());
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

/// Which way the data buffers of a request of `request_type` must go: device-writable
/// (`Some(true)`), device-readable (`Some(false)`), or either (`None`: flush carries no data).
/// Refuses unknown types, and writes of any kind to a read-only device.
fn data_direction(request_type: u32, limits: &Limits) -> Result<Option<bool>, ParseError> {
    let want_write_only = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => Some(true),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => Some(false),
        VIRTIO_BLK_T_FLUSH => None,
        other => return Err(ParseError::Unsupported(other)),
    };
    if limits.read_only && want_write_only == Some(false) {
        return Err(ParseError::ReadOnly);
    }
    Ok(want_write_only)
}

/// Builds the GET_ID answer: the serial, truncated or NUL-padded to 20 bytes.
pub fn id_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    id
}

/// The device's configuration space, `struct virtio_blk_config` with little-endian values,
/// viewed as the bytes a frontend reads.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct ConfigSpace(virtio_blk_config);

// The whole struct, secure-erase and zoned parts included (we leave them zero).
const _: () = assert!(size_of::<virtio_blk_config>() == 96);

// SAFETY: `virtio_blk_config` is repr(C, packed) and made of integers and byte arrays only,
// so it has no padding and any bit pattern is a valid value; repr(transparent) gives the
// newtype that same layout.
unsafe impl ByteValued for ConfigSpace {}

impl ConfigSpace {
    /// Offset of the writeback byte, the only field a driver may write (CONFIG_WCE).
    pub const WRITEBACK: usize = offset_of!(virtio_blk_config, wce);
}

/// Lays out the config space for a device with these limits.
pub fn config_space(
    limits: &Limits,
    num_queues: u16,
    writeback: bool,
    physical_block_size: u32,
) -> ConfigSpace {
    let exp = (physical_block_size / limits.logical_block_size)
        .max(1)
        .trailing_zeros();
    let min_io = (limits.logical_block_size >> SECTOR_SHIFT).max(1) as u16;
    ConfigSpace(virtio_blk_config {
        capacity: limits.capacity_sectors.to_le(),
        size_max: limits.size_max.to_le(),
        seg_max: limits.seg_max.to_le(),
        blk_size: limits.logical_block_size.to_le(),
        physical_block_exp: exp as u8,
        alignment_offset: 0,
        min_io_size: min_io.to_le(),
        opt_io_size: 0,
        wce: u8::from(writeback),
        num_queues: num_queues.to_le(),
        max_discard_sectors: limits.max_discard_sectors.to_le(),
        max_discard_seg: limits.max_discard_seg.to_le(),
        discard_sector_alignment: (limits.logical_block_size >> SECTOR_SHIFT).to_le(),
        max_write_zeroes_sectors: limits.max_write_zeroes_sectors.to_le(),
        max_write_zeroes_seg: limits.max_write_zeroes_seg.to_le(),
        write_zeroes_may_unmap: 1,
        ..virtio_blk_config::default()
    })
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
        m.write_obj(RequestHeader::new(t, sector), GuestAddress(at))
            .unwrap();
        d(at, 16, false)
    }

    /// Parses `descs` as a whole chain: the last one has no next (whatever `d` gave it).
    fn parse(m: &GuestMemoryMmap, descs: &[Descriptor], l: &Limits) -> Result<Request, ParseError> {
        let mut r = Request::default();
        r.parse(ended(descs).into_iter(), m, l).map(|_| r)
    }

    fn ended(descs: &[Descriptor]) -> Vec<Descriptor> {
        let mut v = descs.to_vec();
        if let Some(last) = v.last_mut() {
            let flags = last.flags() & !(VRING_DESC_F_NEXT as u16);
            *last = Descriptor::new(last.addr().0, last.len(), flags, 0);
        }
        v
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
        let r = DiscardRange::new(sector, num, flags);
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
        let config = config_space(&l, 2, true, 4096);
        let c = config.as_slice();
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
