//! `--suite snapshots`: snapshot workloads (issue 4, item 9).
//!
//! 1. A writable snapshot of the raw image (snapblk) against a qcow2 overlay backed by the same
//!    raw image (qemu-storage-daemon), each fresh for every run: first-touch 4 KiB writes (one
//!    per 64 KiB chunk never written before), rewrites of those chunks, and random reads of the
//!    whole device (some chunks written, most from the base).
//! 2. snapblk origin writes with 1 vs `MANY_SNAPSHOTS` read-only snapshots taken beforehand,
//!    from a fresh cache object and a freshly rewritten origin each time, every write the first
//!    one to its chunk since the snapshots (so each one copies the chunk before writing).
//!
//! One queue, QD 32 throughout. Tables give the median over rounds of each side's IOPS and of
//! the per-round ratios, and the range of those ratios. Backends alternate run by run (the one going first rotates
//! each round), so drift on the shared machine hits both alike; the ratios are what count.
//! This is a child module of the `vs_qsd` bench and reuses its daemon and client code.

use super::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;

/// Copy-on-write unit of both sides: snapblk's default chunk size, and the qcow2 overlay's
/// `cluster_size`.
const CHUNK: u64 = 64 << 10;
const QD: usize = 32;
/// Fraction of the snapshot's chunks the first-touch pass writes (one 4 KiB write each).
const SNAP_TOUCH_FRAC: f64 = 0.25;
/// Fraction of the origin's chunks the origin-write pass writes (one 4 KiB write each).
const ORIGIN_TOUCH_FRAC: f64 = 0.5;
const MANY_SNAPSHOTS: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Snapblk,
    Qcow2,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Snapblk => "snapblk",
            Side::Qcow2 => "qsd-qcow2",
        }
    }
}

/// Per-round IOPS of one row: (reference side, other side), both from the same round.
#[derive(Default)]
struct Rounds(Vec<(f64, f64)>);

/// The median of `v`, 0 for none (see `super::median`).
fn median(v: Vec<f64>) -> f64 {
    super::median(v).unwrap_or(0.0)
}

impl Rounds {
    fn add(&mut self, a: (u64, f64), b: (u64, f64)) {
        self.0.push((a.0 as f64 / a.1, b.0 as f64 / b.1));
    }
    /// `| median a | median b | median of the per-round ratios a/b (or b/a when `inverse`) |
    /// min-max of them |`
    fn cells(&self, inverse: bool) -> String {
        let a = median(self.0.iter().map(|x| x.0).collect());
        let b = median(self.0.iter().map(|x| x.1).collect());
        let rs: Vec<f64> = self
            .0
            .iter()
            .map(|&(a, b)| if inverse { b / a } else { a / b })
            .collect();
        if rs.is_empty() {
            return "- | - | - | - |".into();
        }
        let lo = rs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rs.iter().copied().fold(0.0, f64::max);
        format!("{a:.0} | {b:.0} | {:.2} | {lo:.2}-{hi:.2} |", median(rs))
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// Starts `cmd` like `Daemon::start` does (own process group, killed with the bench), with
/// its output in `log`; `sock` is the vhost-user socket `connect` will use.
/// `snapblk serve` of `img` with a fresh cache object; returns the daemon and its control
/// socket path.
fn start_snapblk(img: &Path, dir: &Path, seq: usize) -> Result<(Daemon, PathBuf), String> {
    let cache = dir.join(format!("snapblk-{seq}.cache"));
    let ctrl = dir.join(format!("snapblk-{seq}.control.sock"));
    let _ = std::fs::remove_file(&cache);
    let _ = std::fs::remove_file(&ctrl);
    let sock = dir.join(format!("snapblk-{seq}.sock"));
    let mut cmd = Command::new(snapblk_bin());
    cmd.arg("serve")
        .arg("--origin")
        .arg(img)
        .arg("--socket")
        .arg(&sock)
        .arg("--control")
        .arg(&ctrl)
        .arg("--cache")
        .arg(&cache)
        .arg("--num-queues")
        .arg("1");
    let d = spawn_daemon(cmd, sock, dir.join(format!("snapblk-{seq}.log")))?;
    Ok((d, ctrl))
}

/// A connection to snapblk's control socket.
struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    fn connect(daemon: &mut Daemon, path: &Path) -> Result<Control, String> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            daemon.check_alive()?;
            if let Ok(s) = UnixStream::connect(path) {
                let r = s.try_clone().map_err(|e| format!("dup control fd: {e}"))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                r.set_read_timeout(Some(IO_TIMEOUT)).ok();
                return Ok(Control {
                    w: s,
                    r: BufReader::new(r),
                });
            }
            if Instant::now() > deadline || stopping() {
                return Err(format!(
                    "control socket {} not listening after {CONNECT_TIMEOUT:?}\n{}",
                    path.display(),
                    daemon.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one request; returns its `result`, or the error reply as an error.
    fn call(&mut self, req: serde_json::Value) -> Result<serde_json::Value, String> {
        let mut line = req.to_string();
        line.push('\n');
        self.w
            .write_all(line.as_bytes())
            .map_err(|e| format!("control write: {e}"))?;
        let mut reply = String::new();
        self.r
            .read_line(&mut reply)
            .map_err(|e| format!("control read: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&reply)
            .map_err(|e| format!("control reply {reply:?} for {req}: {e}"))?;
        if v["ok"] == serde_json::Value::Bool(true) {
            Ok(v["result"].clone())
        } else {
            Err(format!("control request {req} failed: {}", v["error"]))
        }
    }
}

/// What a queue does with each request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Io {
    Read,
    Write,
}

/// Keeps `QD` 4 KiB requests in flight on queue 0, at the offsets `next` yields, until it yields
/// `None` or `end` passes. Returns the completed requests and the seconds from the first
/// submission to the last completion. Writes keep the index word of each block
/// (`fill_block`), reads check it.
fn drive(
    client: &mut Client,
    io: Io,
    mut next: impl FnMut() -> Option<u64>,
    end: Option<Instant>,
) -> Result<(u64, f64), String> {
    let bs = BLOCK as usize;
    let buf_of = |slot: usize| (client.region.addr + slot * bs) as *mut u8;
    let word = |slot: usize| buf_of(slot) as *mut u64;
    let q = &mut client.queues[0];
    let mut slot_off = [0u64; QD];
    let submit = |q: &mut Blkioq, slot_off: &mut [u64; QD], slot: usize, off: u64| {
        slot_off[slot] = off;
        match io {
            Io::Read => {
                // SAFETY: the slot is being submitted (no request in flight); the word is inside its buffer.
                unsafe { *word(slot) = u64::MAX };
                q.read(off, buf_of(slot), bs, slot, ReqFlags::empty())
            }
            Io::Write => {
                // SAFETY: as above.
                unsafe { *word(slot) = (off / BLOCK).to_le() };
                q.write(off, buf_of(slot), bs, slot, ReqFlags::empty())
            }
        }
    };
    let mut comps: Vec<MaybeUninit<Completion>> = (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let start = Instant::now();
    let mut in_flight = 0;
    let mut done = false;
    for slot in 0..QD {
        match next() {
            Some(off) => {
                submit(q, &mut slot_off, slot, off);
                in_flight += 1;
            }
            None => {
                done = true;
                break;
            }
        }
    }
    let mut ops = 0u64;
    let mut first_err = None;
    let mut last = start;
    while in_flight > 0 {
        let n = wait_some(q, &mut comps)?;
        last = Instant::now();
        if end.is_some_and(|e| last >= e) || stopping() || first_err.is_some() {
            done = true;
        }
        for c in &comps[..n] {
            // SAFETY: wait_some initialized the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            in_flight -= 1;
            let slot = c.user_data;
            if c.ret != 0 {
                first_err.get_or_insert_with(|| completion_error(&c));
                continue;
            }
            if io == Io::Read {
                // SAFETY: the slot's request has completed; the word is inside its buffer.
                let got = u64::from_le(unsafe { *word(slot) });
                let want = slot_off[slot] / BLOCK;
                if got != want {
                    first_err.get_or_insert(format!(
                        "wrong data: read at offset {}: block starts with {got:#x}, expected \
                         its index {want:#x}",
                        slot_off[slot]
                    ));
                    continue;
                }
            }
            ops += 1;
            if !done {
                match next() {
                    Some(off) => {
                        submit(q, &mut slot_off, slot, off);
                        in_flight += 1;
                    }
                    None => done = true,
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok((ops, (last - start).as_secs_f64())),
    }
}

/// The chunks a first-touch pass writes: `frac` of the device's chunks but the first and the
/// last (which `verify` reads), in random order, the same for every backend of a round.
fn touch_chunks(capacity: u64, frac: f64, seed: u64) -> Vec<u64> {
    let chunks = capacity / CHUNK;
    let mut all: Vec<u64> = (1..chunks - 1).collect();
    fastrand::Rng::with_seed(seed).shuffle(&mut all);
    all.truncate(((chunks as f64 * frac) as usize).clamp(1, all.len()));
    all
}

/// A 4 KiB offset inside one of `chunks`, block chosen at random.
fn block_in(rng: &mut fastrand::Rng, chunk: u64) -> u64 {
    chunk * CHUNK + rng.u64(0..CHUNK / BLOCK) * BLOCK
}

/// First-touch, rewrite and mixed-read IOPS of one fresh writable snapshot or overlay.
fn snapshot_run(
    ctx: &Ctx,
    side: Side,
    seq: usize,
    round: usize,
) -> Result<[(u64, f64); 3], String> {
    let dir = ctx.dir;
    // Write back what earlier runs left dirty now, not during this run's measurement.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let mut control = None;
    let mut daemon = match side {
        Side::Snapblk => {
            let (mut d, ctrl) = start_snapblk(ctx.img, dir, seq)?;
            let snap_sock = dir.join(format!("snap-{seq}.sock"));
            let mut c = Control::connect(&mut d, &ctrl)?;
            c.call(serde_json::json!({
                "v": 1, "cmd": "snapshot-create", "name": "bench", "writable": true,
                "socket": snap_sock.to_string_lossy(),
            }))
            .map_err(|e| format!("{e}\n{}", d.log_tail()))?;
            control = Some(c);
            // Drive the snapshot; stopping the daemon removes this socket.
            d.sock = snap_sock;
            d
        }
        Side::Qcow2 => {
            let ovl = dir.join(format!("overlay-{seq}.qcow2"));
            crate::create_overlay(ctx.img, &ovl)?;
            let sock = dir.join(format!("qsd-qcow2-{seq}.sock"));
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.args(["--object", "iothread,id=io0"])
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=base-file,filename={},aio=io_uring,cache.direct=off,\
                     read-only=on",
                    ctx.img.display()
                ))
                .arg("--blockdev")
                .arg("driver=raw,node-name=base,file=base-file,read-only=on")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=ovl-file,filename={},aio=io_uring,cache.direct=off",
                    ovl.display()
                ))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=ovl,file=ovl-file,backing=base")
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=ovl,addr.type=unix,addr.path={},\
                     writable=on,num-queues=1,iothread=io0",
                    sock.display()
                ));
            spawn_daemon(cmd, sock, dir.join(format!("qsd-qcow2-{seq}.log")))?
        }
    };
    let mut client = connect(&mut daemon, 1, QD * BLOCK as usize, false)?;
    verify(&mut client).map_err(|e| format!("{e}\n{}", daemon.log_tail()))?;
    // SAFETY: the region is mapped for the client's life, `len` bytes long, and no request is in flight yet.
    unsafe { std::ptr::write_bytes(client.region.addr as *mut u8, 0x5a, client.region.len) };
    let capacity = client.capacity;
    let seed = 0x5eed_5a00 + round as u64;
    let chunks = touch_chunks(capacity, SNAP_TOUCH_FRAC, seed);
    let secs = Duration::from_secs_f64(ctx.cfg.secs);
    let fail = |e: String, d: &mut Daemon| {
        let alive = d.check_alive().err().unwrap_or_default();
        format!("{e}\n{alive}\n{}", d.log_tail())
    };

    // First touch: one write into each of `chunks`, never written since the snapshot.
    let mut rng = fastrand::Rng::with_seed(seed ^ 1);
    let mut it = chunks.iter();
    let first = drive(
        &mut client,
        Io::Write,
        || it.next().map(|&c| block_in(&mut rng, c)),
        None,
    )
    .map_err(|e| fail(e, &mut daemon))?;
    if let Some(c) = control.as_mut() {
        println!(
            "# run {seq} (snapblk): {} first-touch writes; {}",
            first.0,
            cow_counters(c).map_err(|e| fail(e, &mut daemon))?
        );
    }
    // Rewrite: random blocks of the chunks written above, for `--secs`.
    let mut rng = fastrand::Rng::with_seed(seed ^ 2);
    let rewrite = drive(
        &mut client,
        Io::Write,
        || {
            let c = chunks[rng.usize(0..chunks.len())];
            Some(block_in(&mut rng, c))
        },
        Some(Instant::now() + secs),
    )
    .map_err(|e| fail(e, &mut daemon))?;
    // Mixed reads: random blocks of the whole device, SNAP_TOUCH_FRAC of them written.
    let mut rng = fastrand::Rng::with_seed(seed ^ 3);
    let blocks = capacity / BLOCK;
    let read = drive(
        &mut client,
        Io::Read,
        || Some(rng.u64(0..blocks) * BLOCK),
        Some(Instant::now() + secs),
    )
    .map_err(|e| fail(e, &mut daemon))?;
    if stopping() {
        return Err("interrupted".into());
    }
    drop(client);
    daemon.check_alive()?;
    daemon.stop();
    let _ = std::fs::remove_file(dir.join(format!("snapblk-{seq}.cache")));
    let _ = std::fs::remove_file(dir.join(format!("overlay-{seq}.qcow2")));
    Ok([first, rewrite, read])
}

/// Origin first-touch writes under `nsnap` read-only snapshots, on a fresh cache object.
/// Returns (requests, seconds) and the seconds the snapshots took to create.
fn origin_run(
    ctx: &Ctx,
    nsnap: usize,
    seq: usize,
    round: usize,
) -> Result<((u64, f64), f64), String> {
    // The previous run wrote to the origin: start again from the pristine pattern (this also
    // puts it back in the page cache).
    create_image(ctx.img, ctx.cfg.image_mib << 20);
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let (mut daemon, ctrl) = start_snapblk(ctx.img, ctx.dir, seq)?;
    let mut c = Control::connect(&mut daemon, &ctrl)?;
    let t = Instant::now();
    for i in 0..nsnap {
        c.call(serde_json::json!({"v": 1, "cmd": "snapshot-create", "name": format!("s{i}")}))
            .map_err(|e| format!("{e}\n{}", daemon.log_tail()))?;
    }
    let create_secs = t.elapsed().as_secs_f64();
    let mut client = connect(&mut daemon, 1, QD * BLOCK as usize, false)?;
    verify(&mut client).map_err(|e| format!("{e}\n{}", daemon.log_tail()))?;
    // SAFETY: the region is mapped for the client's life, `len` bytes long, and no request is in flight yet.
    unsafe { std::ptr::write_bytes(client.region.addr as *mut u8, 0x5a, client.region.len) };
    let seed = 0x0519_0000 + round as u64;
    let chunks = touch_chunks(client.capacity, ORIGIN_TOUCH_FRAC, seed);
    let mut rng = fastrand::Rng::with_seed(seed ^ 1);
    let mut it = chunks.iter();
    let r = drive(
        &mut client,
        Io::Write,
        || it.next().map(|&c| block_in(&mut rng, c)),
        None,
    )
    .map_err(|e| {
        let alive = daemon.check_alive().err().unwrap_or_default();
        format!("{e}\n{alive}\n{}", daemon.log_tail())
    })?;
    if stopping() {
        return Err("interrupted".into());
    }
    println!(
        "# run {seq}: {} origin writes under {nsnap} snapshot(s); {}",
        r.0,
        cow_counters(&mut c).map_err(|e| format!("{e}\n{}", daemon.log_tail()))?
    );
    drop(client);
    drop(c);
    daemon.check_alive()?;
    daemon.stop();
    let _ = std::fs::remove_file(ctx.dir.join(format!("snapblk-{seq}.cache")));
    Ok((r, create_secs))
}

/// The engine's copy-on-write counters, to show that each first-touch write copied a chunk.
fn cow_counters(c: &mut Control) -> Result<String, String> {
    let st = c.call(serde_json::json!({"v": 1, "cmd": "stats"}))?;
    let k = &st["cache"];
    Ok(format!(
        "cache counters: copies {} cow_fills {} bytes_copied {} commits {}",
        k["copies"], k["cow_fills"], k["bytes_copied"], k["commits"]
    ))
}

fn selected(cfg: &Config, part: &str) -> bool {
    cfg.filters.is_empty() || cfg.filters.iter().any(|f| part.contains(f.as_str()))
}

/// Runs the suite; returns the exit code.
pub(super) fn run(ctx: &Ctx) -> i32 {
    let cfg = ctx.cfg;
    let rounds = cfg.rounds;
    let mut errors: Vec<String> = Vec::new();
    let mut seq = 0usize;
    let report = |errors: &mut Vec<String>, what: String, e: String| {
        if !stopping() {
            eprintln!("ERROR {what}: {e}");
            errors.push(format!("{what}: {e}"));
        }
    };

    if selected(cfg, "snapshot-vs-qcow2") {
        println!(
            "\n## writable snapshot (snapblk) vs qcow2 overlay (qsd), 1 queue, QD {QD}, {rounds} \
             round(s), fresh snapshot/overlay per run; first touch: one 4 KiB write into each of \
             {:.0}% of the 64 KiB chunks; rewrite and randread: {} s each",
            SNAP_TOUCH_FRAC * 100.0,
            cfg.secs
        );
        let sides = [Side::Snapblk, Side::Qcow2];
        let mut tally: [Rounds; 3] = Default::default();
        for round in 0..rounds {
            if stopping() {
                break;
            }
            let mut got: [Option<[(u64, f64); 3]>; 2] = [None, None];
            for k in 0..2 {
                let si = (round + k) % 2;
                seq += 1;
                match snapshot_run(ctx, sides[si], seq, round) {
                    Ok(r) => got[si] = Some(r),
                    Err(e) => report(
                        &mut errors,
                        format!("snapshot round {round} on {}", sides[si].name()),
                        e,
                    ),
                }
            }
            if let [Some(a), Some(b)] = got {
                let per = |x: (u64, f64)| x.0 as f64 / x.1;
                println!(
                    "# round {round}: snapblk/qsd-qcow2 first-touch {} rewrite {} randread {}",
                    ratio(per(a[0]), per(b[0])),
                    ratio(per(a[1]), per(b[1])),
                    ratio(per(a[2]), per(b[2]))
                );
                for row in 0..3 {
                    tally[row].add(a[row], b[row]);
                }
            }
        }
        println!(
            "| workload (1 queue, QD 32) | snapblk IOPS | qsd-qcow2 IOPS | snapblk/qsd-qcow2 | \
             per-round range |"
        );
        println!("|---|---:|---:|---:|---:|");
        let names = [
            "first-touch 4k randwrite",
            "rewrite 4k randwrite",
            "4k randread (mixed)",
        ];
        for (row, name) in names.iter().enumerate() {
            println!("| {name} | {}", tally[row].cells(false));
        }
    }

    if selected(cfg, "origin-write") && !stopping() {
        println!(
            "\n## snapblk origin first-touch 4k randwrite, 1 queue, QD {QD}, under 1 vs \
             {MANY_SNAPSHOTS} snapshots; {rounds} round(s), fresh cache object and rewritten \
             origin per run; one 4 KiB write into each of {:.0}% of the 64 KiB chunks",
            ORIGIN_TOUCH_FRAC * 100.0
        );
        let counts = [1, MANY_SNAPSHOTS];
        let mut tally = Rounds::default();
        for round in 0..rounds {
            if stopping() {
                break;
            }
            let mut got = [None, None];
            for k in 0..2 {
                let ci = (round + k) % 2;
                seq += 1;
                match origin_run(ctx, counts[ci], seq, round) {
                    Ok((r, create)) => {
                        println!(
                            "# round {round}: {} snapshot(s) created in {create:.2} s; {} writes \
                             in {:.2} s",
                            counts[ci], r.0, r.1
                        );
                        got[ci] = Some(r);
                    }
                    Err(e) => report(
                        &mut errors,
                        format!("origin round {round} with {} snapshot(s)", counts[ci]),
                        e,
                    ),
                }
            }
            if let [Some(a), Some(b)] = got {
                println!(
                    "# round {round}: {MANY_SNAPSHOTS}/1 = {}",
                    ratio(b.0 as f64 / b.1, a.0 as f64 / a.1)
                );
                tally.add(a, b);
            }
        }
        println!(
            "| workload (1 queue, QD 32) | 1 snapshot IOPS | {MANY_SNAPSHOTS} snapshots IOPS | \
             {MANY_SNAPSHOTS}/1 | per-round range |"
        );
        println!("|---|---:|---:|---:|---:|");
        println!("| origin first-touch 4k randwrite | {}", tally.cells(true));
    }

    exit_code(&errors)
}
