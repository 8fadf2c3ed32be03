//! Fuzzing virtio-blk request parsing as a queue worker reaches it: arbitrary descriptor
//! tables (any flags, `next` links, lengths and addresses, including indirect tables, loops
//! and addresses outside guest memory) in a real split virtqueue, popped by `virtio-queue`'s
//! own chain iterator, with arbitrary header and discard/write-zeroes range bytes in guest
//! memory. `Request::parse` must never panic, and whatever it accepts must be a request the
//! device can carry out safely: inside the device, within the advertised limits, in the
//! right direction, with its status byte in the chain's last descriptor.
//!
//! `SNAPBLK_FUZZ_CASES=N` runs N cases per harness with a random seed; the default run uses
//! a fixed seed (docs/testing.md).

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use snapblk::testkit::fuzz;
use snapblk::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: the queue at 0, indirect tables, headers, data and ranges above it.
const MEM: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
/// Where the two indirect tables live.
const INDIRECT: [u64; 2] = [0x4000, 0x5000];
/// Where the request headers and discard ranges are written.
const HEADERS: u64 = 0x8000;
const RANGES: u64 = 0xA000;
/// Device capacity: 1 MiB.
const CAPACITY: u64 = 1 << 20;

/// One descriptor as the driver might write it.
#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Addresses worth trying: where headers and ranges are, ordinary data, the edges of guest
/// memory, past it, and near the top of the address space.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..4).prop_map(|i| HEADERS + i * 0x100),
        3 => (0u64..4).prop_map(|i| RANGES + i * 0x100),
        3 => 0x1_0000u64..MEM,
        1 => Just(INDIRECT[0]),
        1 => Just(INDIRECT[1]),
        1 => MEM - 64..MEM + 64,
        1 => u64::MAX - 0x1000..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(16u32),
        3 => (1u32..=8).prop_map(|k| k * 512),
        2 => 0u32..64,
        1 => (1u32..=4).prop_map(|k| k * 16),
        1 => Just(1 << 20),
        1 => Just((1 << 20) + 512),
        1 => any::<u32>(),
    ]
}

fn flags() -> impl Strategy<Value = u16> {
    let (n, w, i) = (
        VRING_DESC_F_NEXT as u16,
        VRING_DESC_F_WRITE as u16,
        VRING_DESC_F_INDIRECT as u16,
    );
    prop_oneof![
        6 => prop::sample::select(vec![n, n | w, 0, w]),
        1 => prop::sample::select(vec![i, i | n, i | w]),
        1 => any::<u16>(),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    (
        addr(),
        len(),
        flags(),
        prop_oneof![4 => 0u16..QUEUE_SIZE, 1 => any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Desc {
            addr,
            len,
            flags,
            next,
        })
}

/// A header: a request type (mostly known ones) and a sector (mostly near the device).
fn header() -> impl Strategy<Value = (u32, u64)> {
    (
        prop_oneof![
            8 => prop::sample::select(vec![
                VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
            ]),
            1 => any::<u32>(),
        ],
        prop_oneof![3 => 0u64..2100, 1 => any::<u64>(), 1 => Just(u64::MAX)],
    )
}

/// A discard/write-zeroes range: sector, sectors and flags, mostly plausible.
fn range() -> impl Strategy<Value = (u64, u32, u32)> {
    prop_oneof![
        6 => (0u64..256, 0u32..=6, 0u32..2).prop_map(|(s, n, f)| (s * 8, n * 8, f)),
        1 => (0u64..2100, 0u32..64, 0u32..2),
        1 => (any::<u64>(), any::<u32>(), any::<u32>()),
    ]
}

/// A whole case: the ring's table, two indirect tables, the head index, what lies in guest
/// memory at the header and range addresses, and the device's limits.
#[derive(Debug, Clone)]
struct Case {
    table: Vec<Desc>,
    indirect: [Vec<Desc>; 2],
    head: u16,
    headers: Vec<(u32, u64)>,
    ranges: Vec<(u64, u32, u32)>,
    read_only: bool,
    block_4k: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(desc(), QUEUE_SIZE as usize),
        prop::collection::vec(desc(), 0..8),
        prop::collection::vec(desc(), 0..8),
        prop_oneof![4 => 0u16..4, 1 => any::<u16>()],
        prop::collection::vec(header(), 4),
        prop::collection::vec(range(), 64),
        (
            any::<bool>(),
            prop_oneof![4 => Just(false), 1 => Just(true)],
        ),
        prop_oneof![1 => Just(None), 2 => (any::<bool>(), 2usize..6).prop_map(Some)],
    )
        .prop_map(
            |(table, i0, i1, head, headers, ranges, (read_only, block_4k), shape)| {
                let mut c = Case {
                    table,
                    indirect: [i0, i1],
                    head,
                    headers,
                    ranges,
                    read_only,
                    block_4k,
                };
                if let Some((indirect, n)) = shape {
                    well_formed(&mut c, indirect, n);
                }
                c
            },
        )
}

/// Makes the case's chain well formed in its links (what a correct driver writes), keeping
/// the generated addresses, lengths and data directions: the head at index 0 (or an indirect
/// table of `n` descriptors), a readable 16-byte header, `n - 2` data buffers, a writable
/// status. Most such chains parse, so the checks on accepted requests get exercised.
fn well_formed(c: &mut Case, indirect: bool, n: usize) {
    let (n_flag, w_flag, i_flag) = (
        VRING_DESC_F_NEXT as u16,
        VRING_DESC_F_WRITE as u16,
        VRING_DESC_F_INDIRECT as u16,
    );
    c.head = 0;
    let chain: &mut Vec<Desc> = if indirect {
        c.table[0] = Desc {
            addr: INDIRECT[0],
            len: 16 * n as u32,
            flags: i_flag,
            next: 0,
        };
        &mut c.indirect[0]
    } else {
        &mut c.table
    };
    chain.resize(
        n.max(chain.len()),
        Desc {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        },
    );
    for (i, d) in chain.iter_mut().take(n).enumerate() {
        let last = i == n - 1;
        let w = if i == 0 {
            d.addr = HEADERS + 0x100 * (d.addr % 4);
            d.len = 16;
            0
        } else if last {
            d.len = d.len.clamp(1, 4);
            w_flag
        } else {
            d.flags & w_flag
        };
        d.flags = w | if last { 0 } else { n_flag };
        d.next = i as u16 + 1;
    }
}

fn raw(d: &Desc) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(d.addr, d.len, d.flags, d.next))
}

/// Lays the case out in guest memory and pops the chain the way a queue worker does; parses
/// it and checks the outcome. Returns the kind of request accepted, if any, and whether the
/// chain's head descriptor was an indirect one.
fn run(c: &Case) -> Result<Option<(&'static str, bool)>, TestCaseError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let q = MockSplitQueue::new(&mem, QUEUE_SIZE);
    for (i, d) in c.table.iter().enumerate() {
        q.desc_table().store(i as u16, raw(d)).unwrap();
    }
    for (t, table) in INDIRECT.iter().zip(&c.indirect) {
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(raw(d), GuestAddress(t + 16 * i as u64))
                .unwrap();
        }
    }
    for (i, &(t, s)) in c.headers.iter().enumerate() {
        mem.write_obj(
            RequestHeader::new(t, s),
            GuestAddress(HEADERS + 0x100 * i as u64),
        )
        .unwrap();
    }
    for (i, &(s, n, f)) in c.ranges.iter().enumerate() {
        mem.write_obj(
            DiscardRange::new(s, n, f),
            GuestAddress(RANGES + 16 * i as u64),
        )
        .unwrap();
    }
    q.avail().ring().ref_at(0).unwrap().store(c.head.to_le());
    q.avail().idx().store(1u16.to_le());
    let mut queue: Queue = q.create_queue().unwrap();
    let Some(chain) = queue.pop_descriptor_chain(&mem) else {
        return Ok(None); // the ring itself was refused (e.g. a head index out of range)
    };
    let limits = Limits::new(
        CAPACITY,
        if c.block_4k { 4096 } else { 512 },
        c.read_only,
        8,
    );
    let indirect = c
        .table
        .get(usize::from(c.head))
        .is_some_and(|d| d.flags & VRING_DESC_F_INDIRECT as u16 != 0);
    let descs: Vec<Descriptor> = chain.clone().collect();
    let mut req = Request::default();
    match req.parse(chain, &mem, &limits) {
        Ok(()) => {
            check_accepted(&req, &descs, &limits)?;
            Ok(Some((kind_name(&req.kind), indirect)))
        }
        Err(e) => {
            let status = e.status();
            prop_assert!(status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP);
            Ok(None)
        }
    }
}

fn kind_name(k: &RequestKind) -> &'static str {
    match k {
        RequestKind::Read { .. } => "read",
        RequestKind::Write { .. } => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId => "get-id",
        RequestKind::Discard => "discard",
        RequestKind::WriteZeroes => "write-zeroes",
    }
}

/// Everything a request that parsed must be.
fn check_accepted(
    req: &Request,
    descs: &[Descriptor],
    limits: &Limits,
) -> Result<(), TestCaseError> {
    let last = descs.last().expect("an accepted chain has descriptors");
    prop_assert!(last.is_write_only() && last.len() > 0);
    prop_assert_eq!(
        req.status.addr.0,
        last.addr().0 + u64::from(last.len()) - 1,
        "status byte"
    );
    prop_assert!(!descs[0].is_write_only() && descs[0].len() >= 16, "header");
    let size = limits.capacity_sectors * 512;
    prop_assert_eq!(
        req.segments.iter().map(|s| u64::from(s.len)).sum::<u64>(),
        req.data_len
    );
    prop_assert!(req.segments.len() <= limits.seg_max as usize);
    prop_assert!(req
        .segments
        .iter()
        .all(|s| s.len <= limits.size_max && s.len > 0));
    let block = u64::from(limits.logical_block_size);
    match req.kind {
        RequestKind::Read { offset } | RequestKind::Write { offset } => {
            let write = matches!(req.kind, RequestKind::Write { .. });
            prop_assert!(
                !(write && limits.read_only),
                "a write to a read-only device"
            );
            prop_assert!(offset.checked_add(req.data_len).is_some_and(|e| e <= size));
            prop_assert_eq!(offset % block, 0);
            prop_assert_eq!(req.data_len % block, 0);
            // Every data buffer goes the way the request needs (device-writable for reads).
            let data = &descs[1..descs.len() - 1];
            for d in data.iter().filter(|d| d.len() > 0) {
                prop_assert_eq!(d.is_write_only(), !write, "data direction");
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            prop_assert!(!limits.read_only);
            prop_assert!(!req.ranges.is_empty());
            let (max_seg, max_sectors) = if req.kind == RequestKind::Discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            prop_assert!(req.ranges.len() <= max_seg as usize);
            for r in &req.ranges {
                prop_assert!(r.offset.checked_add(r.len).is_some_and(|e| e <= size));
                prop_assert!(r.len <= u64::from(max_sectors) * 512);
                prop_assert_eq!(r.offset % block, 0);
                prop_assert_eq!(r.len % block, 0);
                prop_assert!(!(r.unmap && req.kind == RequestKind::Discard));
            }
        }
        RequestKind::GetId => prop_assert!(req.data_len > 0),
        RequestKind::Flush => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz::cases(3000),
        failure_persistence: None,
        rng_seed: fuzz::seed().map_or(RngSeed::Random, RngSeed::Fixed),
        ..ProptestConfig::default()
    })]

    /// Arbitrary rings, indirect tables and request bytes: no panic, and anything accepted
    /// is safe to carry out.
    #[test]
    fn arbitrary_descriptor_tables_parse_safely(c in case()) {
        run(&c)?;
    }
}

/// The harness reaches every kind of request, through indirect tables too: a harness whose
/// generator never produced a valid request would pass while testing nothing.
#[test]
fn the_generator_reaches_accepted_requests_of_every_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut kinds = std::collections::BTreeMap::new();
    let mut via_indirect = 0;
    for _ in 0..10_000 {
        let c = case().new_tree(&mut runner).unwrap().current();
        match run(&c) {
            Ok(Some((kind, indirect))) => {
                *kinds.entry(kind).or_insert(0) += 1;
                via_indirect += usize::from(indirect);
            }
            Ok(None) => {}
            Err(e) => panic!("{e}: {c:?}"),
        }
    }
    eprintln!("accepted of 10000: {kinds:?}, {via_indirect} through an indirect table");
    assert_eq!(kinds.len(), 6, "kinds reached: {kinds:?}");
    assert!(
        via_indirect > 0,
        "no request was accepted through an indirect table"
    );
}
