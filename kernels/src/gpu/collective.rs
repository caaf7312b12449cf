//! Summing gradients across ranks without leaving the device: the [`DeviceCollective`] seam a
//! data-parallel trainer hands its fp32 gradient buffers to as backward finishes them, NCCL
//! on GPUs ([`super::nccl::NcclCollective`], feature "cuda") and an in-process group of
//! emulated devices ([`EmuCollective::group`]) that lets CI run the same trainer path with
//! several ranks on the CPU.
//!
//! # Ordering
//!
//! `queue_all_reduce` returns at once. The sums run after everything already queued on the
//! device's compute stream (the gradients they read are final) and, on a GPU, on a stream of
//! their own, so they overlap the backward work queued afterwards. `join` orders the compute
//! stream's later work (the optimizer) after every queued sum; the host waits only where it
//! reads something back. Between queueing a buffer and `join`, nothing may write or free it.

use std::sync::{Arc, Condvar, Mutex};

use super::{DevicePtr, GpuError};

/// Stops a collective from another thread: pending and later operations fail instead of
/// waiting for a peer that is gone (NCCL: `ncclCommAbort`). Calling it twice is harmless.
pub type AbortHandle = Arc<dyn Fn() + Send + Sync>;

/// Sums fp32 device buffers across the ranks of a job, asynchronously with the device's
/// compute (see the module documentation for the ordering rules).
pub trait DeviceCollective: Send {
    /// This rank, `0 .. world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn world_size(&self) -> usize;
    /// Queues the in-place sum across ranks of each `(address, f32 count)` buffer, as one
    /// group, after the work queued so far on the device; returns without waiting. Every rank
    /// must queue the same lengths in the same order.
    ///
    /// # Safety
    /// Each address covers its count of f32 in this device's memory, which stays allocated
    /// and is neither written nor read by other work until [`DeviceCollective::join`].
    unsafe fn queue_all_reduce(&mut self, buffers: &[(DevicePtr, usize)]) -> Result<(), GpuError>;
    /// Orders the device's later work after every sum queued so far.
    fn join(&mut self) -> Result<(), GpuError>;
    /// Device seconds the sums since the previous `join` took, once the host has waited for
    /// them (None where the device cannot tell).
    fn last_seconds(&mut self) -> Option<f64> {
        None
    }
    /// A handle that aborts this collective from any thread.
    fn abort_handle(&self) -> AbortHandle;
}

/// One round of an [`EmuCollective`] group: what each rank deposited, then the sum every rank copies.
#[derive(Default)]
struct Round {
    deposits: Vec<Option<Vec<f32>>>,
    sum: Option<Arc<Vec<f32>>>,
    collected: usize,
    aborted: bool,
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One rank of a group of ranks in one process summing through host memory, for devices whose
/// memory *is* host memory (the emulated device). Sums are deferred to `join`, as a GPU's
/// would be pending, so a trainer that reads a gradient before joining reads the unsummed
/// value and fails its tests. The sum of element `i` is `((a_0 + a_1) + a_2) + …` in rank order.
pub struct EmuCollective {
    rank: usize,
    shared: Arc<Shared>,
    queued: Vec<(DevicePtr, usize)>,
}

impl EmuCollective {
    /// `world` connected members, one per rank (move each to its rank's thread).
    pub fn group(world: usize) -> Vec<EmuCollective> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round { deposits: vec![None; world], ..Round::default() }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| EmuCollective { rank, shared: shared.clone(), queued: Vec::new() })
            .collect()
    }
}

fn aborted() -> GpuError {
    GpuError::Collective("the collective was aborted".into())
}

impl DeviceCollective for EmuCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    unsafe fn queue_all_reduce(&mut self, buffers: &[(DevicePtr, usize)]) -> Result<(), GpuError> {
        self.queued.extend_from_slice(buffers);
        Ok(())
    }

    fn join(&mut self) -> Result<(), GpuError> {
        let queued = std::mem::take(&mut self.queued);
        // SAFETY: emulated device memory is host memory; `queue_all_reduce`'s contract keeps
        // each buffer alive and untouched until now.
        let mine: Vec<f32> = queued
            .iter()
            .flat_map(|&(ptr, len)| unsafe {
                std::slice::from_raw_parts(ptr as *const f32, len).iter().copied()
            })
            .collect();
        let shared = &*self.shared;
        let mut round = shared.round.lock().expect("emulated collective");
        // A rank that runs ahead waits until the previous round has been collected by all.
        while round.sum.is_some() && !round.aborted {
            round = shared.changed.wait(round).expect("emulated collective");
        }
        if round.aborted {
            return Err(aborted());
        }
        round.deposits[self.rank] = Some(mine);
        if round.deposits.iter().all(Option::is_some) {
            let deposits: Vec<Vec<f32>> =
                round.deposits.iter_mut().flat_map(Option::take).collect();
            if let Some(bad) = deposits.iter().position(|d| d.len() != deposits[0].len()) {
                round.aborted = true;
                shared.changed.notify_all();
                return Err(GpuError::Collective(format!(
                    "ranks queued different lengths: rank 0 {} floats, rank {bad} {}",
                    deposits[0].len(),
                    deposits[bad].len()
                )));
            }
            let mut sum = deposits[0].clone();
            for other in &deposits[1..] {
                for (s, x) in sum.iter_mut().zip(other) {
                    *s += x;
                }
            }
            round.sum = Some(Arc::new(sum));
            shared.changed.notify_all();
        }
        let sum = loop {
            if round.aborted {
                return Err(aborted());
            }
            if let Some(sum) = &round.sum {
                break sum.clone();
            }
            round = shared.changed.wait(round).expect("emulated collective");
        };
        round.collected += 1;
        if round.collected == shared.world {
            round.sum = None;
            round.collected = 0;
            shared.changed.notify_all();
        }
        drop(round);
        let mut offset = 0;
        for (ptr, len) in queued {
            // SAFETY: as above; the buffer is this rank's and nobody else writes it.
            let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, len) };
            out.copy_from_slice(&sum[offset..offset + len]);
            offset += len;
        }
        Ok(())
    }

    fn abort_handle(&self) -> AbortHandle {
        let shared = self.shared.clone();
        Arc::new(move || {
            if let Ok(mut round) = shared.round.lock() {
                round.aborted = true;
            }
            shared.changed.notify_all();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_ranks(world: usize, rounds: usize) -> Vec<Vec<Vec<f32>>> {
        let members = EmuCollective::group(world);
        let handles: Vec<_> = members
            .into_iter()
            .map(|mut member| {
                std::thread::spawn(move || {
                    let rank = member.rank();
                    (0..rounds)
                        .map(|round| {
                            let mut a: Vec<f32> =
                                (0..5).map(|i| (rank * 100 + round * 10 + i) as f32).collect();
                            let mut b = vec![0.5f32 * rank as f32; 3];
                            // SAFETY: host vectors that outlive the join.
                            unsafe {
                                member
                                    .queue_all_reduce(&[
                                        (a.as_mut_ptr() as DevicePtr, a.len()),
                                        (b.as_mut_ptr() as DevicePtr, b.len()),
                                    ])
                                    .unwrap();
                            }
                            // Deferred like a GPU's: nothing summed before the join.
                            assert_eq!(a[0], (rank * 100 + round * 10) as f32);
                            member.join().unwrap();
                            a.extend(b);
                            a
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_ends_with_the_rank_ordered_sum() {
        let results = run_ranks(3, 4);
        for round in 0..4 {
            let want: Vec<f32> = (0..5)
                .map(|i| (0..3).map(|r| (r * 100 + round * 10 + i) as f32).sum())
                .chain(std::iter::repeat_n(0.0 + 0.5 + 1.0, 3))
                .collect();
            for rank in &results {
                assert_eq!(rank[round], want, "round {round}");
            }
        }
    }

    #[test]
    fn mismatched_lengths_and_aborts_fail_every_rank() {
        let mut members = EmuCollective::group(2);
        let mut second = members.pop().unwrap();
        let mut first = members.pop().unwrap();
        let peer = std::thread::spawn(move || {
            let mut x = vec![1.0f32; 4];
            // SAFETY: a host vector that outlives the join.
            unsafe { second.queue_all_reduce(&[(x.as_mut_ptr() as DevicePtr, 4)]).unwrap() };
            second.join()
        });
        let mut y = vec![1.0f32; 3];
        // SAFETY: as above.
        unsafe { first.queue_all_reduce(&[(y.as_mut_ptr() as DevicePtr, 3)]).unwrap() };
        let mine = first.join();
        let theirs = peer.join().unwrap();
        assert!(mine.is_err() && theirs.is_err(), "{mine:?} {theirs:?}");

        let mut members = EmuCollective::group(2);
        let lonely = members.pop().unwrap();
        let abort = lonely.abort_handle();
        let mut waiting = members.pop().unwrap();
        let waiter = std::thread::spawn(move || waiting.join());
        std::thread::sleep(std::time::Duration::from_millis(50));
        abort();
        let err = waiter.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("aborted"), "{err}");
    }
}
