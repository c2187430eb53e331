//! Fault injection as a decorator over the ports, in the manner of mountpoint-s3's
//! `failure_client`: a test wraps the real adapter (or an in-memory port) in [`Faulty`], says
//! which operations fail, and reads back how many calls, injected faults and errors of the
//! wrapped port each operation saw, so a fault test can show that its fault happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::hook::JobEvent;
use crate::webhook::{
    Claim, DeadLetter, DeliveryClaim, DeliveryLedger, EventSink, FallbackQueue, PortError,
    QueuedHook,
};

/// An operation of the intake's ports, the unit faults are planned and counted in. Its text
/// is the port method's name (`claim`, `put_job_event`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// [`DeliveryLedger::claim`]
    Claim,
    /// [`DeliveryLedger::mark_forwarded`]
    MarkForwarded,
    /// [`DeliveryLedger::release`]
    Release,
    /// [`EventSink::put_job_event`]
    PutJobEvent,
    /// [`EventSink::put_dead_letter`]
    PutDeadLetter,
    /// [`FallbackQueue::keep`]
    Keep,
}

crate::text::serde_text!(Op);

/// Calls of each operation, faults injected into them, and errors the wrapped port returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpCounts {
    pub calls: usize,
    pub injected: usize,
    pub errors: usize,
}

/// A port that fails the operations it is told to (before they reach the wrapped port), and
/// counts every call, every injected fault and every error of the wrapped port, per [`Op`]. The
/// wrapped port is shared, so that the webhook and the drainer can see one ledger or one bus.
#[derive(Debug)]
pub struct Faulty<P> {
    inner: Arc<P>,
    /// Operation -> how many of its next calls fail (`usize::MAX`: all).
    plan: Mutex<HashMap<Op, usize>>,
    counts: Mutex<HashMap<Op, OpCounts>>,
}

impl<P> Faulty<P> {
    pub fn new(inner: P) -> Self {
        Self::over(Arc::new(inner))
    }

    /// Over a port shared with others.
    pub fn over(inner: Arc<P>) -> Self {
        Self {
            inner,
            plan: Mutex::default(),
            counts: Mutex::default(),
        }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The next `n` calls of `op` fail.
    pub fn fail_next(self, op: Op, n: usize) -> Self {
        self.fail(op, n);
        self
    }

    /// From now on, the next `n` calls of `op` fail (for a port already in use).
    pub fn fail(&self, op: Op, n: usize) {
        self.plan.lock().expect("plan lock").insert(op, n);
    }

    /// Every call of `op` fails.
    pub fn fail_all(self, op: Op) -> Self {
        self.fail_next(op, usize::MAX)
    }

    pub fn counts(&self, op: Op) -> OpCounts {
        self.counts
            .lock()
            .expect("counts lock")
            .get(&op)
            .copied()
            .unwrap_or_default()
    }

    /// Faults injected and errors of the wrapped port, over every operation.
    pub fn failures(&self) -> usize {
        let counts = self.counts.lock().expect("counts lock");
        counts.values().map(|c| c.injected + c.errors).sum()
    }

    /// Counts the call; `Err` if this one is to fail.
    fn enter(&self, op: Op) -> Result<(), PortError> {
        let inject = {
            let mut plan = self.plan.lock().expect("plan lock");
            match plan.get_mut(&op) {
                Some(left) if *left > 0 => {
                    if *left != usize::MAX {
                        *left -= 1;
                    }
                    true
                }
                _ => false,
            }
        };
        let mut counts = self.counts.lock().expect("counts lock");
        let c = counts.entry(op).or_default();
        c.calls += 1;
        if inject {
            c.injected += 1;
            return Err(PortError(format!("injected fault in {op}")));
        }
        Ok(())
    }

    fn exit<T>(&self, op: Op, result: Result<T, PortError>) -> Result<T, PortError> {
        if result.is_err() {
            let mut counts = self.counts.lock().expect("counts lock");
            counts.entry(op).or_default().errors += 1;
        }
        result
    }
}

impl<L: DeliveryLedger + Send + Sync> DeliveryLedger for Faulty<L> {
    async fn claim(&self, claim: &DeliveryClaim<'_>) -> Result<Claim, PortError> {
        self.enter(Op::Claim)?;
        self.exit(Op::Claim, self.inner.claim(claim).await)
    }
    async fn mark_forwarded(&self, delivery_id: &str, now_ms: u64) -> Result<(), PortError> {
        self.enter(Op::MarkForwarded)?;
        let result = self.inner.mark_forwarded(delivery_id, now_ms).await;
        self.exit(Op::MarkForwarded, result)
    }
    async fn release(&self, delivery_id: &str) -> Result<(), PortError> {
        self.enter(Op::Release)?;
        self.exit(Op::Release, self.inner.release(delivery_id).await)
    }
}

impl<S: EventSink + Send + Sync> EventSink for Faulty<S> {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        self.enter(Op::PutJobEvent)?;
        self.exit(Op::PutJobEvent, self.inner.put_job_event(event).await)
    }
    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.enter(Op::PutDeadLetter)?;
        self.exit(Op::PutDeadLetter, self.inner.put_dead_letter(letter).await)
    }
}

impl<Q: FallbackQueue + Send + Sync> FallbackQueue for Faulty<Q> {
    async fn keep(&self, hook: &QueuedHook) -> Result<(), PortError> {
        self.enter(Op::Keep)?;
        self.exit(Op::Keep, self.inner.keep(hook).await)
    }
}

/// The fallback queue in memory: the message bodies, in order, as SQS would hold them.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    messages: Mutex<Vec<String>>,
}

impl MemoryQueue {
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("queue lock").clone()
    }
}

impl FallbackQueue for MemoryQueue {
    async fn keep(&self, hook: &QueuedHook) -> Result<(), PortError> {
        let body = hook.to_message()?;
        self.messages.lock().expect("queue lock").push(body);
        Ok(())
    }
}
