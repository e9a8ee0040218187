//! A serving simulation: many requests of varied prompt and output lengths share a fixed KV
//! memory budget (counted in token slots). Each step every running sequence produces one token
//! (its first step also processes its prompt); waiting requests are admitted first-come
//! first-served while memory allows.
//!
//! * **Contiguous** (pre-vLLM servers): a sequence reserves `max_seq` slots when admitted, since
//!   its final length is unknown; everything beyond its current length is reserved but unused.
//! * **Paged**: a sequence holds `⌈len / B⌉` blocks from a [`BlockAllocator`], taking one more
//!   when it fills its last; if the pool is empty the newest running sequence is preempted (its
//!   blocks freed, the request re-queued to be recomputed, vLLM's default).
//!
//! Waste = `1 − used / reserved`, summed over steps.

use crate::paged::{BlockAllocator, SeqId};
use candle_core::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::VecDeque;

/// One request: when it arrives (step), its prompt length and how many tokens it will generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Request {
    pub arrival: usize,
    pub prompt: usize,
    pub output: usize,
}

/// `n` requests arriving `per_step` per step, lengths uniform in the given inclusive ranges.
pub fn workload(
    n: usize,
    per_step: usize,
    prompt: (usize, usize),
    output: (usize, usize),
    seed: u64,
) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| Request {
            arrival: i / per_step.max(1),
            prompt: rng.random_range(prompt.0..=prompt.1),
            output: rng.random_range(output.0..=output.1),
        })
        .collect()
}

/// How KV memory is handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Policy {
    Contiguous,
    Paged { block_size: usize },
}

/// What a simulated run measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimResult {
    pub policy: Policy,
    pub steps: usize,
    pub finished: usize,
    /// Tokens of finished requests (work redone after a preemption not counted).
    pub generated_tokens: usize,
    /// Mean running sequences per step.
    pub mean_batch: f64,
    pub max_batch: usize,
    /// Σ used slots / Σ reserved slots over steps.
    pub used_fraction: f64,
    pub waste_pct: f64,
    /// Mean reserved fraction of the budget.
    pub budget_utilisation: f64,
    pub preemptions: usize,
    /// Generated tokens per step (throughput if a step costs the same whatever the batch).
    pub tokens_per_step: f64,
}

struct Running {
    req: usize,
    len: usize,
    generated: usize,
    seq: Option<SeqId>,
}

/// Runs `requests` to completion under `policy` with `budget` token slots and `max_seq` per sequence.
pub fn simulate(
    requests: &[Request],
    policy: Policy,
    budget: usize,
    max_seq: usize,
) -> Result<SimResult> {
    for (i, r) in requests.iter().enumerate() {
        if r.prompt + r.output > max_seq || r.prompt == 0 || r.output == 0 {
            candle_core::bail!(
                "request {i} ({} + {} tokens) does not fit max_seq {max_seq}",
                r.prompt,
                r.output
            );
        }
    }
    let alloc = match policy {
        Policy::Paged { block_size } => Some(BlockAllocator::new(
            block_size,
            budget / block_size,
            max_seq,
        )?),
        Policy::Contiguous => None,
    };
    let mut sim = Simulator {
        requests,
        budget,
        max_seq,
        alloc,
        queue: VecDeque::new(),
        running: Vec::new(),
        tally: Tally::default(),
    };
    let mut next = 0;
    while sim.tally.finished < requests.len() {
        while next < requests.len() && requests[next].arrival <= sim.tally.steps {
            sim.queue.push_back(next);
            next += 1;
        }
        sim.admit()?;
        sim.grow()?;
        sim.record();
        sim.complete()?;
        sim.tally.steps += 1;
        if sim.tally.steps > 100 * (requests.len() + max_seq) {
            candle_core::bail!(
                "simulation does not progress (budget {budget} too small for max_seq {max_seq}?)"
            );
        }
    }
    if let Some(a) = &sim.alloc {
        debug_assert_eq!(a.free_blocks(), a.num_blocks, "blocks leaked");
    }
    Ok(sim.tally.result(policy, budget))
}

/// Counters summed over the steps of a simulation.
#[derive(Default)]
struct Tally {
    steps: usize,
    finished: usize,
    generated: usize,
    preemptions: usize,
    used_sum: usize,
    reserved_sum: usize,
    batch_sum: usize,
    max_batch: usize,
}

impl Tally {
    fn result(&self, policy: Policy, budget: usize) -> SimResult {
        let used_fraction = self.used_sum as f64 / self.reserved_sum.max(1) as f64;
        SimResult {
            policy,
            steps: self.steps,
            finished: self.finished,
            generated_tokens: self.generated,
            mean_batch: self.batch_sum as f64 / self.steps as f64,
            max_batch: self.max_batch,
            used_fraction,
            waste_pct: 100.0 * (1.0 - used_fraction),
            budget_utilisation: self.reserved_sum as f64 / (self.steps * budget) as f64,
            preemptions: self.preemptions,
            tokens_per_step: self.generated as f64 / self.steps as f64,
        }
    }
}

/// The state of a serving simulation between steps.
struct Simulator<'a> {
    requests: &'a [Request],
    budget: usize,
    max_seq: usize,
    /// The block pool (paged policy) or `None` (contiguous reservations of `max_seq` slots).
    alloc: Option<BlockAllocator>,
    queue: VecDeque<usize>,
    running: Vec<Running>,
    tally: Tally,
}

impl Simulator<'_> {
    /// Admission, first come first served: the head of the queue must fit its prompt + 1 token.
    fn admit(&mut self) -> Result<()> {
        while let Some(&r) = self.queue.front() {
            let need = self.requests[r].prompt + 1;
            let seq = match self.alloc.as_mut() {
                None if (self.running.len() + 1) * self.max_seq <= self.budget => None,
                None => break,
                Some(a) => {
                    let s = a.add_sequence();
                    if a.reserve(s, need).is_err() {
                        a.free_sequence(s)?;
                        break;
                    }
                    Some(s)
                }
            };
            self.queue.pop_front();
            self.running.push(Running {
                req: r,
                len: 0,
                generated: 0,
                seq,
            });
        }
        Ok(())
    }

    /// Every running sequence grows by its prompt (first step) or one token; paged ones may
    /// need a block, preempting the newest sequences when the pool is empty.
    fn grow(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.running.len() {
            let grow = if self.running[i].len == 0 {
                self.requests[self.running[i].req].prompt + 1
            } else {
                1
            };
            if let (Some(a), Some(s)) = (self.alloc.as_mut(), self.running[i].seq) {
                let have = a.seq(s)?.table.len() * a.block_size - a.seq(s)?.len;
                if have < grow && a.reserve(s, grow).is_err() {
                    // Preempt the newest (last) sequence and retry; if that is us, we are requeued.
                    let victim = self.running.pop().expect("non-empty");
                    a.free_sequence(victim.seq.expect("paged"))?;
                    self.queue.push_front(victim.req);
                    self.tally.preemptions += 1;
                    continue;
                }
                a.advance(s, grow)?;
            }
            self.running[i].len += grow;
            self.running[i].generated += 1;
            i += 1;
        }
        Ok(())
    }

    /// Batch size, used and reserved slots of this step.
    fn record(&mut self) {
        let t = &mut self.tally;
        t.batch_sum += self.running.len();
        t.max_batch = t.max_batch.max(self.running.len());
        t.used_sum += self.running.iter().map(|r| r.len).sum::<usize>();
        t.reserved_sum += match &self.alloc {
            None => self.running.len() * self.max_seq,
            Some(a) => a.used_blocks() * a.block_size,
        };
    }

    /// Completion frees memory.
    fn complete(&mut self) -> Result<()> {
        let mut j = 0;
        while j < self.running.len() {
            if self.running[j].generated >= self.requests[self.running[j].req].output {
                let done = self.running.swap_remove(j);
                if let (Some(a), Some(s)) = (self.alloc.as_mut(), done.seq) {
                    a.free_sequence(s)?;
                }
                self.tally.finished += 1;
                self.tally.generated += self.requests[done.req].output;
            } else {
                j += 1;
            }
        }
        Ok(())
    }
}

/// Blocks used by `n` sequences of `prefix + own[i]` tokens, without and with sharing the
/// prefix's blocks (forked from one sequence holding the prefix): `(without, with)`.
pub fn prefix_sharing_blocks(
    prefix: usize,
    own: &[usize],
    block_size: usize,
    max_seq: usize,
) -> Result<(usize, usize)> {
    let total_blocks = own
        .iter()
        .map(|o| (prefix + o).div_ceil(block_size))
        .sum::<usize>()
        + prefix.div_ceil(block_size)
        + 1;
    let mut a = BlockAllocator::new(block_size, total_blocks, max_seq)?;
    for &o in own {
        let s = a.add_sequence();
        a.reserve(s, prefix + o)?;
        a.advance(s, prefix + o)?;
    }
    let without = a.used_blocks();
    let mut b = BlockAllocator::new(block_size, total_blocks, max_seq)?;
    let root = b.add_sequence();
    b.reserve(root, prefix)?;
    b.advance(root, prefix)?;
    for &o in own {
        let s = b.fork(root)?;
        b.reserve(s, o)?; // copy-on-write of the partly filled last prefix block, then its own blocks
        b.advance(s, o)?;
    }
    b.free_sequence(root)?; // the prefix lives on in its forks
    Ok((without, b.used_blocks()))
}
