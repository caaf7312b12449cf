//! Gradient all-reduce for data-parallel training: the [`Collective`] seam the trainer sums its
//! gradients through, with [`Solo`] (one worker) and [`TcpRing`] (CPU workers in a ring over
//! TCP). NCCL will come later behind the same trait.
//!
//! # Ring all-reduce
//!
//! A buffer of `len` floats is cut into buckets of `bucket` floats ([`BUCKET`] unless set with
//! [`TcpRing::with_bucket`]; the last one shorter), reduced one after another so the extra
//! memory stays around one bucket's bytes whatever the buffer size. Each bucket of length `L` is
//! cut into `n` chunks, chunk `c` starting at `c * (L / n) + min(c, L % n)`: boundaries depend
//! only on (`len`, `n`, `bucket`). With `r` this rank, all indices modulo `n`:
//!
//! - reduce-scatter, steps `s = 0 .. n-1`: send chunk `r - s` to rank `r + 1`, receive chunk
//!   `r - s - 1` from rank `r - 1` and store `received + own`. Rank `r` ends with the total of
//!   chunk `r + 1`;
//! - all-gather, steps `s = 0 .. n-1`: send chunk `r + 1 - s`, receive chunk `r - s` and store it.
//!
//! Each total is computed once, by one rank, and copied to the others: every rank ends with the
//! same bits.
//!
//! **Summation order.** An element in chunk `c` of its bucket, with `a_k` the value of rank `k`,
//! is `((a_c + a_{c+1}) + a_{c+2}) + … + a_{c+n-1}` (left to right, f32). It depends only on
//! (`len`, `n`, `bucket`), never on timing, so training is bitwise reproducible for a given world
//! size. For `n = 2` it is `a_0 + a_1` (IEEE addition is commutative), the sequential sum.
//!
//! # Wire format
//!
//! Handshake, from the connecting rank: `b"chgring1"`, then `job_key`, rank and world size as
//! little-endian u64; reply: the magic, a status (0 accepted, else why not), the acceptor's rank
//! and world size. Every `all_reduce_sum` starts with a header (call number, length, bucket,
//! little-endian u64) so ranks that disagree fail with [`CollectiveError::Mismatch`] instead of
//! exchanging garbage; then chunks go as raw little-endian f32 bytes, their sizes known to both
//! sides.
//!
//! # Failures
//!
//! A helper thread writes to the next rank while the calling thread reads from the previous one,
//! so two neighbours sending large chunks to each other never both wait for a reader. Any error
//! shuts both sockets down: the neighbours read end-of-file at once and fail in turn, so a dead
//! worker stops the whole ring in one hop per rank rather than after a timeout. The ring is then
//! unusable ([`CollectiveError::Broken`]); the job restarts from its last checkpoint.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Default bucket: floats reduced per round (4 MiB of f32).
pub const BUCKET: usize = 1 << 20;

/// Default limit on waiting for a neighbour during `all_reduce_sum` (a read that gets nothing or
/// a write that cannot progress). Generous: a neighbour may still be computing its gradients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Protocol name and version, first bytes of both handshake messages.
const MAGIC: [u8; 8] = *b"chgring1";
const HELLO_LEN: usize = 32;
const REPLY_LEN: usize = 32;
const HEADER_LEN: usize = 24;

/// Reply statuses.
const ACCEPTED: u64 = 0;
const WRONG_JOB: u64 = 1;
const WRONG_WORLD: u64 = 2;
const WRONG_RANK: u64 = 3;

/// How long an accepted connection may stay silent before it is dropped as a stray, so a port
/// scanner cannot use up the whole handshake timeout.
const STRAY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between connection attempts while the next rank is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Pause between polls of the non-blocking listener.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Sums buffers across the ranks of a job. Implementations: [`Solo`] (world size 1),
/// [`TcpRing`] (CPU ring over TCP); NCCL comes later behind the same trait.
pub trait Collective: Send {
    /// This worker's rank, `0 .. world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the job.
    fn world_size(&self) -> usize;
    /// Elementwise sum of `data` across all ranks, in place. Every rank ends with bit-identical
    /// values; the summation order for each element depends only on (world size, `data.len()`),
    /// never on timing, so training is bitwise reproducible for a given world size. Every rank
    /// must make the same calls with the same lengths, in the same order.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
}

/// The collective of a job with one worker: rank 0 of 1, summing is a no-op.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Why a collective operation failed. Messages name the peer rank and its address.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Arguments that cannot make a ring.
    #[error("invalid ring: {0}")]
    Config(String),
    /// The next rank could not be reached before the handshake deadline.
    #[error(
        "could not connect to rank {rank} ({addr}) within {after:?}: {source}; is that worker running and its address right?"
    )]
    ConnectTimeout {
        /// The rank this one connects to.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// The handshake timeout.
        after: Duration,
        /// The last connection attempt's error.
        #[source]
        source: io::Error,
    },
    /// The previous rank did not connect to this rank's listener before the deadline.
    #[error(
        "rank {rank} ({addr}) did not connect to this rank's listener {listen} within {after:?}{}",
        rejected_note(.rejected)
    )]
    AcceptTimeout {
        /// The rank expected to connect.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// This rank's listening address.
        listen: SocketAddr,
        /// The handshake timeout.
        after: Duration,
        /// Connections that were rejected meanwhile: source address and reason.
        rejected: Vec<String>,
    },
    /// A neighbour does not belong to this ring (other job, world size or rank) or does not
    /// speak its protocol.
    #[error("handshake with rank {rank} ({addr}) failed: {reason}")]
    Handshake {
        /// The neighbour's rank.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// What did not match.
        reason: String,
    },
    /// A neighbour closed or reset its connection.
    #[error(
        "rank {rank} ({addr}) closed the connection during {during}: the worker probably died (or stopped after an error of its own; see its log)"
    )]
    PeerClosed {
        /// The neighbour's rank.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// `"handshake"` or `"all-reduce"`.
        during: &'static str,
    },
    /// A neighbour neither sent nor read anything for too long.
    #[error(
        "no progress with rank {rank} ({addr}) for {after:?} during {during}: that worker is probably stuck or unreachable"
    )]
    Timeout {
        /// The neighbour's rank.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// The limit that ran out.
        after: Duration,
        /// `"handshake"` or `"all-reduce"`.
        during: &'static str,
    },
    /// Any other I/O error on a neighbour's connection.
    #[error("{during} with rank {rank} ({addr}): {source}")]
    Io {
        /// The neighbour's rank.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// `"set-up"`, `"handshake"` or `"all-reduce"`.
        during: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The previous rank is making a different call (another length, bucket size or call count).
    #[error(
        "rank {rank} ({addr}) is in all-reduce call {their_call} with {their_len} floats in buckets of {their_bucket}, but this rank is in call {our_call} with {our_len} floats in buckets of {our_bucket}: every rank must make the same calls with the same lengths and bucket size"
    )]
    Mismatch {
        /// The previous rank.
        rank: usize,
        /// Its listening address.
        addr: SocketAddr,
        /// This rank's call number, counted from 0.
        our_call: u64,
        /// This rank's buffer length.
        our_len: u64,
        /// This rank's bucket size.
        our_bucket: u64,
        /// The previous rank's call number.
        their_call: u64,
        /// The previous rank's buffer length.
        their_len: u64,
        /// The previous rank's bucket size.
        their_bucket: u64,
    },
    /// An earlier error left the ring in an unknown state.
    #[error("the ring is unusable after an earlier error ({0}); build a new one")]
    Broken(String),
}

fn rejected_note(rejected: &[String]) -> String {
    if rejected.is_empty() {
        String::new()
    } else {
        format!(
            " (rejected meanwhile: {}; check the job key and rank of those workers)",
            rejected.join("; ")
        )
    }
}

/// A bound listener on which a rank waits for its previous rank. Binding comes before
/// [`TcpRing::connect`] so a launcher can bind every worker (port 0 picks a free one), collect the
/// addresses and only then connect.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// Binds `addr`.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        Ok(RingListener { listener, addr })
    }

    /// The bound address, with the actual port when bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Traffic and time of a [`TcpRing`], for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// `all_reduce_sum` calls, failed ones included.
    pub calls: u64,
    /// Bytes written to the next rank (headers included).
    pub bytes_sent: u64,
    /// Bytes read from the previous rank (headers included).
    pub bytes_received: u64,
    /// Wall time spent inside `all_reduce_sum`.
    pub time: Duration,
}

/// A neighbour: its rank and listening address, for error messages.
#[derive(Debug, Clone, Copy)]
struct Peer {
    rank: usize,
    addr: SocketAddr,
}

impl Peer {
    fn error(self, during: &'static str, source: io::Error, after: Duration) -> CollectiveError {
        let (rank, addr) = (self.rank, self.addr);
        match source.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => CollectiveError::PeerClosed { rank, addr, during },
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CollectiveError::Timeout { rank, addr, after, during }
            }
            _ => CollectiveError::Io { rank, addr, during, source },
        }
    }
}

/// One rank of a CPU ring all-reduce over TCP; see the module doc for the algorithm.
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// Written only: to rank + 1.
    next: TcpStream,
    /// Read only: from rank - 1.
    prev: TcpStream,
    next_peer: Peer,
    prev_peer: Peer,
    bucket: usize,
    io_timeout: Duration,
    /// Why the ring is unusable, after an error.
    broken: Option<String>,
    /// Incoming chunk bytes, kept between calls.
    recv_buf: Vec<u8>,
    /// Outgoing chunk buffers the sender has finished with, kept between calls.
    spare: Vec<Vec<u8>>,
    stats: RingStats,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("next", &self.next_peer)
            .field("prev", &self.prev_peer)
            .field("bucket", &self.bucket)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// What a connecting rank says about itself.
#[derive(Debug, Clone, Copy)]
struct Hello {
    job_key: u64,
    rank: usize,
    world: usize,
}

impl Hello {
    fn encode(self) -> [u8; HELLO_LEN] {
        let mut b = [0; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.job_key.to_le_bytes());
        b[16..24].copy_from_slice(&(self.rank as u64).to_le_bytes());
        b[24..32].copy_from_slice(&(self.world as u64).to_le_bytes());
        b
    }

    /// `None` when the bytes are not our protocol.
    fn decode(b: &[u8; HELLO_LEN]) -> Option<Hello> {
        (b[..8] == MAGIC).then(|| Hello {
            job_key: u64_at(b, 8),
            rank: u64_at(b, 16) as usize,
            world: u64_at(b, 24) as usize,
        })
    }
}

fn reply(status: u64, rank: usize, world: usize) -> [u8; REPLY_LEN] {
    let mut b = [0; REPLY_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&status.to_le_bytes());
    b[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    b[24..32].copy_from_slice(&(world as u64).to_le_bytes());
    b
}

/// What a rank announces at the start of every `all_reduce_sum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    call: u64,
    len: u64,
    bucket: u64,
}

impl Header {
    fn encode(self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[..8].copy_from_slice(&self.call.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.bucket.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Header {
        Header { call: u64_at(b, 0), len: u64_at(b, 8), bucket: u64_at(b, 16) }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Chunk `c` of `n` over a bucket of `len` floats: sizes differ by at most one, the larger first.
fn chunk_range(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// A socket timeout that `set_*_timeout` accepts (zero is refused there).
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

impl TcpRing {
    /// Connects rank `rank` of `peers.len()` into a ring: connects to `peers[(rank+1)%n]`,
    /// accepts the connection from `(rank-1+n)%n` on `listener`, within `timeout`. The connecting
    /// side sends its rank, the world size and `job_key`; the accepting side checks all three,
    /// rejects strays (another job, a wrong rank) and keeps waiting for the right peer. `peers`
    /// are the listening addresses of all ranks, in rank order, identical on every rank.
    pub fn connect(
        listener: RingListener,
        rank: usize,
        peers: &[SocketAddr],
        job_key: u64,
        timeout: Duration,
    ) -> Result<TcpRing, CollectiveError> {
        let world = peers.len();
        if world < 2 {
            return Err(CollectiveError::Config(format!(
                "a ring needs at least 2 ranks, got {world}; use Solo for a single worker"
            )));
        }
        if rank >= world {
            return Err(CollectiveError::Config(format!(
                "rank {rank} is outside a world of {world} ranks"
            )));
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_peer = Peer { rank: next_rank, addr: peers[next_rank] };
        let prev_peer = Peer { rank: prev_rank, addr: peers[prev_rank] };
        let me = Hello { job_key, rank, world };
        let deadline = Instant::now() + timeout;
        let dial_failed = AtomicBool::new(false);

        // Dial on a helper thread while accepting here: each rank waits for its next rank's reply
        // while that rank may itself be dialling, so doing one after the other could deadlock.
        let (dialled, accepted) = thread::scope(|s| {
            let dialler = s.spawn(|| {
                let r = dial(next_peer, me, deadline, timeout);
                dial_failed.store(r.is_err(), Ordering::Release);
                r
            });
            let accepted = accept(&listener, prev_peer, me, deadline, timeout, &dial_failed);
            let dialled = dialler.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (dialled, accepted)
        });
        // A dial error explains an aborted accept, never the other way round.
        let next = dialled?;
        let prev = accepted?;
        drop(listener);

        let setup = |peer: Peer| move |e: io::Error| peer.error("set-up", e, timeout);
        next.set_nodelay(true).map_err(setup(next_peer))?;
        prev.set_nodelay(true).map_err(setup(prev_peer))?;
        let mut ring = TcpRing {
            rank,
            world,
            next,
            prev,
            next_peer,
            prev_peer,
            bucket: BUCKET,
            io_timeout: IO_TIMEOUT,
            broken: None,
            recv_buf: Vec::new(),
            spare: Vec::new(),
            stats: RingStats::default(),
        };
        ring.set_io_timeout(IO_TIMEOUT)?;
        tracing::debug!(
            rank,
            world,
            next = %next_peer.addr,
            prev = %prev_peer.addr,
            "ring connected"
        );
        Ok(ring)
    }

    /// Uses buckets of `floats` floats instead of [`BUCKET`]. Every rank must use the same value
    /// (checked on every call); it changes where chunk boundaries fall, hence the summation order
    /// for `n > 2`.
    ///
    /// # Panics
    /// If `floats` is 0.
    pub fn with_bucket(mut self, floats: usize) -> Self {
        assert!(floats > 0, "a ring bucket must hold at least one float");
        self.bucket = floats;
        self
    }

    /// Limits how long `all_reduce_sum` waits for a neighbour that neither sends nor reads
    /// ([`IO_TIMEOUT`] by default) before failing with [`CollectiveError::Timeout`].
    pub fn set_io_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        if timeout.is_zero() {
            return Err(CollectiveError::Config("the I/O timeout must be positive".into()));
        }
        let (next_peer, prev_peer) = (self.next_peer, self.prev_peer);
        self.next
            .set_write_timeout(Some(timeout))
            .map_err(|e| next_peer.error("set-up", e, timeout))?;
        self.prev
            .set_read_timeout(Some(timeout))
            .map_err(|e| prev_peer.error("set-up", e, timeout))?;
        self.io_timeout = timeout;
        Ok(())
    }

    /// Bytes sent and received so far and time spent inside `all_reduce_sum` (for metrics).
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// The whole operation; on error the caller marks the ring broken.
    fn reduce(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let header =
            Header { call: self.stats.calls, len: data.len() as u64, bucket: self.bucket as u64 };
        let (rank, world, bucket) = (self.rank, self.world, self.bucket);
        let (next, prev) = (&self.next, &self.prev);
        let (next_peer, timeout) = (self.next_peer, self.io_timeout);
        // The first error is the cause; the ones it provokes (reads and writes on sockets shut
        // down because of it) are echoes and are dropped.
        let failure = OnceLock::new();
        let (outbox_tx, outbox_rx) = mpsc::channel::<Vec<u8>>();
        let (done_tx, done_rx) = mpsc::channel::<Vec<u8>>();
        let mut flow = Flow {
            outbox: Some(outbox_tx),
            done: done_rx,
            spare: &mut self.spare,
            prev,
            prev_peer: self.prev_peer,
            timeout,
            recv_buf: &mut self.recv_buf,
            received: 0,
        };

        let sent = thread::scope(|s| {
            let sender =
                s.spawn(|| send_loop(next, prev, outbox_rx, done_tx, next_peer, timeout, &failure));
            let outcome = flow
                .header(header)
                .and_then(|()| data.chunks_mut(bucket).try_for_each(|b| flow.ring(b, rank, world)));
            let join = |sender: thread::ScopedJoinHandle<'_, u64>| {
                sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            };
            // Closing the outbox lets the sender finish what is queued (the next rank needs it)
            // and end.
            match outcome {
                Ok(()) => {
                    flow.close();
                    join(sender)
                }
                // Only our header is queued (it cannot block): let it reach the next rank so that
                // rank reports the mismatch too, rather than a closed connection.
                Err(e @ CollectiveError::Mismatch { .. }) => {
                    flow.close();
                    let sent = join(sender);
                    fail(&failure, e, [prev, next]);
                    sent
                }
                // Shut down first: the sender may be blocked writing to a rank that is gone.
                Err(e) => {
                    fail(&failure, e, [prev, next]);
                    flow.close();
                    join(sender)
                }
            }
        });
        self.stats.bytes_sent += sent;
        self.stats.bytes_received += flow.received;
        flow.reclaim();
        match failure.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if let Some(why) = &self.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let started = Instant::now();
        let result = self.reduce(data);
        self.stats.calls += 1;
        self.stats.time += started.elapsed();
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            // Already shut down when the error happened; repeated so no path can skip it.
            shutdown([&self.prev, &self.next]);
            tracing::debug!(rank = self.rank, error = %e, "ring all-reduce failed");
        }
        result
    }
}

/// Dials the next rank until it answers or the deadline passes, then introduces this rank.
fn dial(
    next: Peer,
    me: Hello,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = at_least_1ms(left.min(Duration::from_secs(1)));
        match TcpStream::connect_timeout(&next.addr, attempt) {
            Ok(stream) => break stream,
            // Refused: the next rank has not bound its listener yet, or is restarting.
            Err(_) if Instant::now() + RETRY_PAUSE < deadline => thread::sleep(RETRY_PAUSE),
            Err(source) => {
                return Err(CollectiveError::ConnectTimeout {
                    rank: next.rank,
                    addr: next.addr,
                    after: timeout,
                    source,
                });
            }
        }
    };
    let io = |e| next.error("handshake", e, timeout);
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(at_least_1ms(left))).map_err(io)?;
    stream.write_all(&me.encode()).map_err(io)?;
    let mut answer = [0; REPLY_LEN];
    stream.read_exact(&mut answer).map_err(io)?;

    let refuse =
        |reason: String| CollectiveError::Handshake { rank: next.rank, addr: next.addr, reason };
    if answer[..8] != MAGIC {
        return Err(refuse(
            "it does not speak the chingu ring protocol; is the address right?".into(),
        ));
    }
    let (their_rank, their_world) = (u64_at(&answer, 16), u64_at(&answer, 24));
    match u64_at(&answer, 8) {
        ACCEPTED => {}
        WRONG_JOB => {
            return Err(refuse(format!(
                "it rejected this rank: job key mismatch (this rank has {:#x}); the two workers belong to different jobs",
                me.job_key
            )));
        }
        WRONG_WORLD => {
            return Err(refuse(format!(
                "it rejected this rank: it is in a world of {their_world} ranks, this rank in one of {}",
                me.world
            )));
        }
        WRONG_RANK => {
            return Err(refuse(format!(
                "it rejected this rank: it expected another rank than {}; the peer lists of the two workers differ",
                me.rank
            )));
        }
        other => return Err(refuse(format!("it answered with unknown status {other}"))),
    }
    if their_rank != next.rank as u64 || their_world != me.world as u64 {
        return Err(refuse(format!(
            "it says it is rank {their_rank} of {their_world}, expected rank {} of {}; the peer lists of the two workers differ",
            next.rank, me.world
        )));
    }
    Ok(stream)
}

/// Waits on `listener` for the previous rank, rejecting strays, until the deadline passes or the
/// dial side has failed.
fn accept(
    listener: &RingListener,
    prev: Peer,
    me: Hello,
    deadline: Instant,
    timeout: Duration,
    give_up: &AtomicBool,
) -> Result<TcpStream, CollectiveError> {
    let io = |e| prev.error("handshake", e, timeout);
    // Non-blocking so the deadline and `give_up` are noticed: std has no accept timeout.
    listener.listener.set_nonblocking(true).map_err(io)?;
    let mut rejected = Vec::new();
    loop {
        match listener.listener.accept() {
            Ok((stream, from)) => match greet(stream, prev, me, deadline) {
                Ok(stream) => return Ok(stream),
                Err(reason) => {
                    tracing::warn!(rank = me.rank, %from, %reason, "rejected a connection to the ring listener");
                    rejected.push(format!("{from}: {reason}"));
                    continue;
                }
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            // The connection went away before we took it: not our business.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(io(e)),
        }
        if give_up.load(Ordering::Acquire) {
            return Err(CollectiveError::Handshake {
                rank: prev.rank,
                addr: prev.addr,
                reason: "gave up waiting: connecting to the next rank failed".into(),
            });
        }
        if Instant::now() >= deadline {
            return Err(CollectiveError::AcceptTimeout {
                rank: prev.rank,
                addr: prev.addr,
                listen: listener.addr,
                after: timeout,
                rejected,
            });
        }
        thread::sleep(ACCEPT_POLL);
    }
}

/// Reads a connecting worker's hello and answers it; `Err` says why it is not our previous rank.
fn greet(
    mut stream: TcpStream,
    prev: Peer,
    me: Hello,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(at_least_1ms(left.min(STRAY_TIMEOUT)))))
        .map_err(|e| format!("cannot configure the socket: {e}"))?;
    let mut hello = [0; HELLO_LEN];
    stream.read_exact(&mut hello).map_err(|e| format!("no handshake received: {e}"))?;
    let Some(them) = Hello::decode(&hello) else {
        return Err("not the chingu ring protocol".into());
    };
    let (status, reason) = if them.job_key != me.job_key {
        (WRONG_JOB, format!("job key {:#x} is not this job's {:#x}", them.job_key, me.job_key))
    } else if them.world != me.world {
        (
            WRONG_WORLD,
            format!("it is in a world of {} ranks, this job has {}", them.world, me.world),
        )
    } else if them.rank != prev.rank {
        (WRONG_RANK, format!("it is rank {}, only rank {} connects here", them.rank, prev.rank))
    } else {
        (ACCEPTED, String::new())
    };
    stream
        .write_all(&reply(status, me.rank, me.world))
        .map_err(|e| format!("cannot answer its handshake: {e}"))?;
    if status == ACCEPTED {
        Ok(stream)
    } else {
        Err(reason)
    }
}

/// Records `err` unless an earlier error is already the cause, and shuts both sockets down so the
/// other thread and both neighbours stop waiting.
fn fail(failure: &OnceLock<CollectiveError>, err: CollectiveError, streams: [&TcpStream; 2]) {
    let _ = failure.set(err);
    shutdown(streams);
}

fn shutdown(streams: [&TcpStream; 2]) {
    for stream in streams {
        // Fails only when already shut down or reset, which is the state we want.
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// The sending half: writes queued messages to the next rank in order, hands each buffer back
/// for reuse, and returns the bytes written. Ends when the outbox closes or a write fails.
fn send_loop(
    next: &TcpStream,
    prev: &TcpStream,
    outbox: mpsc::Receiver<Vec<u8>>,
    done: mpsc::Sender<Vec<u8>>,
    next_peer: Peer,
    timeout: Duration,
    failure: &OnceLock<CollectiveError>,
) -> u64 {
    let mut sent = 0;
    for message in outbox {
        let mut writer = next;
        if let Err(e) = writer.write_all(&message) {
            fail(failure, next_peer.error("all-reduce", e, timeout), [prev, next]);
            break;
        }
        sent += message.len() as u64;
        // The receiving end only goes away once the operation is over.
        let _ = done.send(message);
    }
    sent
}

/// The receiving half of one `all_reduce_sum`, run on the calling thread: queues messages for the
/// sender and reads the previous rank's.
struct Flow<'a> {
    /// `None` once closed.
    outbox: Option<mpsc::Sender<Vec<u8>>>,
    done: mpsc::Receiver<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
    prev: &'a TcpStream,
    prev_peer: Peer,
    timeout: Duration,
    recv_buf: &'a mut Vec<u8>,
    received: u64,
}

impl Flow<'_> {
    /// Exchanges call headers with the neighbours and checks the previous rank's against ours.
    fn header(&mut self, ours: Header) -> Result<(), CollectiveError> {
        self.queue(|buf| buf.extend_from_slice(&ours.encode()))?;
        let theirs = Header::decode(self.read(HEADER_LEN)?);
        if theirs != ours {
            return Err(CollectiveError::Mismatch {
                rank: self.prev_peer.rank,
                addr: self.prev_peer.addr,
                our_call: ours.call,
                our_len: ours.len,
                our_bucket: ours.bucket,
                their_call: theirs.call,
                their_len: theirs.len,
                their_bucket: theirs.bucket,
            });
        }
        Ok(())
    }

    /// Ring all-reduce of one bucket (see the module doc for the schedule).
    fn ring(
        &mut self,
        bucket: &mut [f32],
        rank: usize,
        world: usize,
    ) -> Result<(), CollectiveError> {
        let len = bucket.len();
        for step in 0..world - 1 {
            let out = chunk_range(len, world, (rank + world - step) % world);
            let into = chunk_range(len, world, (rank + 2 * world - step - 1) % world);
            self.send(&bucket[out])?;
            let incoming = self.read(4 * into.len())?;
            for (x, b) in bucket[into].iter_mut().zip(incoming.chunks_exact(4)) {
                // own + received equals received + own (IEEE addition commutes): the partial sum
                // so far, then this rank's term, as documented.
                *x += f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        for step in 0..world - 1 {
            let out = chunk_range(len, world, (rank + 1 + world - step) % world);
            let into = chunk_range(len, world, (rank + world - step) % world);
            self.send(&bucket[out])?;
            let incoming = self.read(4 * into.len())?;
            for (x, b) in bucket[into].iter_mut().zip(incoming.chunks_exact(4)) {
                *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }

    fn send(&mut self, chunk: &[f32]) -> Result<(), CollectiveError> {
        self.queue(|buf| {
            buf.reserve(4 * chunk.len());
            for x in chunk {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        })
    }

    /// Queues one message, built by `fill` into a reused buffer.
    fn queue(&mut self, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), CollectiveError> {
        let mut buf = match self.spare.pop() {
            Some(buf) => buf,
            None => self.done.try_recv().unwrap_or_default(),
        };
        buf.clear();
        fill(&mut buf);
        let sent = self.outbox.as_ref().map(|outbox| outbox.send(buf));
        // Err: the sender stopped early, which it only does after recording its error; that
        // error wins over this one.
        sent.and_then(Result::ok)
            .ok_or_else(|| CollectiveError::Broken("the sending thread stopped".into()))
    }

    /// Reads exactly `n` bytes from the previous rank.
    fn read(&mut self, n: usize) -> Result<&[u8], CollectiveError> {
        self.recv_buf.resize(n, 0);
        let mut reader = self.prev;
        reader
            .read_exact(self.recv_buf)
            .map_err(|e| self.prev_peer.error("all-reduce", e, self.timeout))?;
        self.received += n as u64;
        Ok(self.recv_buf)
    }

    /// Closes the outbox so the sender ends once its queue is written.
    fn close(&mut self) {
        self.outbox = None;
    }

    /// Keeps the buffers the sender handed back for the next call.
    fn reclaim(self) {
        self.spare.extend(self.done.try_iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: u64 = 0x6368_696e_6775;
    const CONNECT: Duration = Duration::from_secs(10);
    /// Small bucket so tests cross bucket boundaries quickly.
    const TEST_BUCKET: usize = 64;

    /// SplitMix64, so inputs are the same on every run.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Values in (-8, 8) with magnitudes spread over several binades, so rounding matters.
        fn f32(&mut self) -> f32 {
            let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            unit * (1u32 << (self.next() % 7)) as f32 / 8.0
        }
    }

    fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut g = Gen(seed);
        (0..world).map(|_| (0..len).map(|_| g.f32()).collect()).collect()
    }

    fn listeners(world: usize) -> (Vec<RingListener>, Vec<SocketAddr>) {
        let ls: Vec<_> = (0..world)
            .map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
            .collect();
        let addrs = ls.iter().map(RingListener::local_addr).collect();
        (ls, addrs)
    }

    /// Connects every rank with its own job key, each on its own thread.
    fn connect_all(keys: &[u64]) -> Vec<Result<TcpRing, CollectiveError>> {
        let (ls, addrs) = listeners(keys.len());
        thread::scope(|s| {
            let handles: Vec<_> = ls
                .into_iter()
                .zip(keys)
                .enumerate()
                .map(|(rank, (l, &key))| {
                    let addrs = &addrs;
                    s.spawn(move || TcpRing::connect(l, rank, addrs, key, CONNECT))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn ring(world: usize, bucket: usize) -> Vec<TcpRing> {
        connect_all(&vec![KEY; world]).into_iter().map(|r| r.unwrap().with_bucket(bucket)).collect()
    }

    /// Every rank reduces its own buffer on its own thread; returns the results in rank order.
    fn reduce_all(
        rings: &mut [TcpRing],
        data: &[Vec<f32>],
    ) -> Vec<Result<Vec<f32>, CollectiveError>> {
        thread::scope(|s| {
            let handles: Vec<_> = rings
                .iter_mut()
                .zip(data)
                .map(|(ring, d)| {
                    s.spawn(move || {
                        let mut d = d.clone();
                        ring.all_reduce_sum(&mut d).map(|()| d)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The order the module doc promises, computed directly.
    fn documented_sum(data: &[Vec<f32>], bucket: usize) -> Vec<f32> {
        let (world, len) = (data.len(), data[0].len());
        (0..len)
            .map(|i| {
                let (start, blen) = (i / bucket * bucket, bucket.min(len - i / bucket * bucket));
                let c = (0..world)
                    .find(|&c| chunk_range(blen, world, c).contains(&(i - start)))
                    .unwrap();
                let mut acc = data[c][i];
                for k in 1..world {
                    acc += data[(c + k) % world][i];
                }
                acc
            })
            .collect()
    }

    /// Tolerance against the f64 sum: 1e-5 relative to the sum of magnitudes, since an f32 sum of
    /// n terms may be off by about n * 2^-24 times that (relative to the result itself it is
    /// unbounded under cancellation).
    fn assert_close_to_f64(data: &[Vec<f32>], got: &[f32]) {
        for (i, &g) in got.iter().enumerate() {
            let exact: f64 = data.iter().map(|d| f64::from(d[i])).sum();
            let scale: f64 = data.iter().map(|d| f64::from(d[i]).abs()).sum();
            let err = (f64::from(g) - exact).abs();
            assert!(
                err <= 1e-5 * scale.max(f64::MIN_POSITIVE),
                "element {i}: got {g}, f64 sum {exact}, error {err} over tolerance {}",
                1e-5 * scale
            );
        }
    }

    /// Reduces, checks every rank agrees bit for bit and returns the common result.
    fn check_world(world: usize, len: usize, bucket: usize, seed: u64) -> Vec<f32> {
        let mut rings = ring(world, bucket);
        let data = inputs(world, len, seed);
        let results: Vec<_> =
            reduce_all(&mut rings, &data).into_iter().map(Result::unwrap).collect();
        for (rank, r) in results.iter().enumerate() {
            assert_eq!(
                bits(r),
                bits(&results[0]),
                "rank {rank} differs from rank 0 (world {world}, len {len})"
            );
        }
        if world == 2 {
            let seq: Vec<f32> = data[0].iter().zip(&data[1]).map(|(a, b)| a + b).collect();
            assert_eq!(bits(&results[0]), bits(&seq), "len {len}: not a0 + a1");
        }
        assert_eq!(
            bits(&results[0]),
            bits(&documented_sum(&data, bucket)),
            "world {world}, len {len}: not the documented order"
        );
        assert_close_to_f64(&data, &results[0]);

        // The same call again on the same ring gives the same bits.
        let again = reduce_all(&mut rings, &data);
        for r in again {
            assert_eq!(bits(&r.unwrap()), bits(&results[0]), "rerun differs");
        }
        results.into_iter().next().unwrap()
    }

    const LENGTHS: [usize; 5] = [0, 1, 3, 1000, 3 * TEST_BUCKET + 5];

    #[test]
    fn chunks_tile_the_bucket() {
        for len in [0, 1, 3, 7, 64, 1000] {
            for n in 1..6 {
                let mut next = 0;
                for c in 0..n {
                    let r = chunk_range(len, n, c);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / n || r.len() == len / n + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn solo_is_a_no_op() {
        let mut solo = Solo;
        let mut data = vec![1.5, -2.0];
        solo.all_reduce_sum(&mut data).unwrap();
        assert_eq!(data, [1.5, -2.0]);
        assert_eq!((solo.rank(), solo.world_size()), (0, 1));
    }

    #[test]
    fn two_ranks_give_exactly_a0_plus_a1() {
        for (i, len) in LENGTHS.into_iter().enumerate() {
            check_world(2, len, TEST_BUCKET, 100 + i as u64);
        }
    }

    #[test]
    fn three_ranks_agree_and_follow_the_documented_order() {
        for (i, len) in LENGTHS.into_iter().enumerate() {
            check_world(3, len, TEST_BUCKET, 200 + i as u64);
        }
    }

    #[test]
    fn four_ranks_agree_and_follow_the_documented_order() {
        for (i, len) in LENGTHS.into_iter().enumerate() {
            check_world(4, len, TEST_BUCKET, 300 + i as u64);
        }
    }

    #[test]
    fn default_bucket_handles_more_than_one_bucket() {
        let len = BUCKET + 7;
        let mut rings: Vec<_> = connect_all(&[KEY; 3]).into_iter().map(Result::unwrap).collect();
        let data = inputs(3, len, 400);
        let results: Vec<_> =
            reduce_all(&mut rings, &data).into_iter().map(Result::unwrap).collect();
        assert_eq!(bits(&results[1]), bits(&results[0]));
        assert_eq!(bits(&results[2]), bits(&results[0]));
        assert_eq!(bits(&results[0]), bits(&documented_sum(&data, BUCKET)));
        assert_close_to_f64(&data, &results[0]);
    }

    #[test]
    fn stats_count_the_traffic() {
        let mut rings = ring(2, TEST_BUCKET);
        let len = 1000;
        for r in reduce_all(&mut rings, &inputs(2, len, 5)) {
            r.unwrap();
        }
        for ring in &rings {
            let stats = ring.stats();
            // With two ranks each sends half the floats in each phase, plus the header.
            let expected = (4 * len + HEADER_LEN) as u64;
            assert_eq!(stats.calls, 1);
            assert_eq!(stats.bytes_sent, expected);
            assert_eq!(stats.bytes_received, expected);
            assert!(stats.time > Duration::ZERO);
        }
    }

    #[test]
    fn wrong_job_key_is_rejected() {
        let started = Instant::now();
        for result in connect_all(&[KEY, KEY + 1]) {
            let err = result.unwrap_err();
            assert!(matches!(err, CollectiveError::Handshake { .. }), "unexpected error: {err}");
            assert!(err.to_string().contains("job key"), "{err}");
        }
        assert!(started.elapsed() < CONNECT, "rejection should not wait for the timeout");
    }

    #[test]
    fn stray_connection_is_rejected_and_the_ring_still_forms() {
        let (ls, addrs) = listeners(2);
        // A worker of another job knocks on rank 0's listener before rank 1 does.
        let mut stray = TcpStream::connect(addrs[0]).unwrap();
        let hello = Hello { job_key: KEY ^ 1, rank: 1, world: 2 };
        stray.write_all(&hello.encode()).unwrap();
        let mut rings: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    s.spawn(move || TcpRing::connect(l, rank, addrs, KEY, CONNECT))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        let mut answer = [0; REPLY_LEN];
        stray.read_exact(&mut answer).unwrap();
        assert_eq!(u64_at(&answer, 8), WRONG_JOB);

        let results = reduce_all(&mut rings, &[vec![1.0, 2.0], vec![10.0, 20.0]]);
        for r in results {
            assert_eq!(r.unwrap(), [11.0, 22.0]);
        }
    }

    #[test]
    fn missing_peer_times_out() {
        let (mut ls, addrs) = listeners(2);
        let l0 = ls.remove(0);
        // Rank 1 never comes up: nothing listens at its address.
        drop(ls);
        let started = Instant::now();
        let err = TcpRing::connect(l0, 0, &addrs, KEY, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(err, CollectiveError::ConnectTimeout { rank: 1, .. }),
            "unexpected error: {err}"
        );
        assert!(err.to_string().contains("rank 1"), "{err}");
    }

    #[test]
    fn bad_configuration_is_refused() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let l = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = TcpRing::connect(l, 0, &[addr], KEY, CONNECT).unwrap_err();
        assert!(err.to_string().contains("Solo"), "{err}");
        let l = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = TcpRing::connect(l, 2, &[addr, addr], KEY, CONNECT).unwrap_err();
        assert!(matches!(err, CollectiveError::Config(_)), "{err}");
    }

    #[test]
    fn different_lengths_are_reported() {
        let mut rings = ring(2, TEST_BUCKET);
        let results = reduce_all(&mut rings, &[vec![1.0; 10], vec![1.0; 12]]);
        for r in results {
            let err = r.unwrap_err();
            assert!(matches!(err, CollectiveError::Mismatch { .. }), "unexpected error: {err}");
        }
    }

    #[test]
    fn peer_dying_mid_call_fails_promptly() {
        let mut rings = ring(2, TEST_BUCKET);
        let len = 3 * TEST_BUCKET;
        let dying = rings.pop().unwrap();
        let mut survivor = rings.pop().unwrap();
        let started = Instant::now();
        let failed = thread::scope(|s| {
            let h = s.spawn(|| survivor.all_reduce_sum(&mut vec![1.0; len]));
            // Rank 1 starts the call like a real worker, sends part of its first chunk, and dies.
            let header = Header { call: 0, len: len as u64, bucket: TEST_BUCKET as u64 };
            let mut w = &dying.next;
            w.write_all(&header.encode()).unwrap();
            w.write_all(&[0; 40]).unwrap();
            drop(dying);
            h.join().unwrap()
        });
        let err = failed.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(
            matches!(err, CollectiveError::PeerClosed { rank: 1, .. }),
            "unexpected error: {err}"
        );
        assert!(err.to_string().contains("rank 1"), "{err}");
        let again = survivor.all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(matches!(again, CollectiveError::Broken(_)), "{again}");
    }

    #[test]
    fn dropped_rank_stops_the_whole_ring() {
        let mut rings = ring(3, TEST_BUCKET);
        let data = inputs(3, 500, 7);
        for r in reduce_all(&mut rings, &data) {
            r.unwrap();
        }
        drop(rings.pop());
        let started = Instant::now();
        let results = reduce_all(&mut rings, &data[..2]);
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        for r in results {
            let err = r.unwrap_err();
            assert!(matches!(err, CollectiveError::PeerClosed { .. }), "unexpected error: {err}");
        }
    }

    #[test]
    fn silent_peer_times_out() {
        let mut rings = ring(2, TEST_BUCKET);
        rings[0].set_io_timeout(Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        // Rank 1 is alive but never joins the call.
        let err = rings[0].all_reduce_sum(&mut [1.0; 10]).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, CollectiveError::Timeout { rank: 1, .. }), "unexpected error: {err}");
    }
}
