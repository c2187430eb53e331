//! For tests: fault injection as a decorator over the ports (in the manner of mountpoint-s3's
//! `failure_client`), and an in-memory fallback queue. Generic and never instantiated by the
//! binaries, so it costs them nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ephemeral_core::hook::JobEvent;
use ephemeral_core::webhook::{
    Claim, DeadLetter, DeliveryClaim, DeliveryLedger, EventSink, FallbackQueue, PortError,
    QueuedHook,
};

/// Calls of each operation, faults injected into them, and errors the wrapped port returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpCounts {
    pub calls: usize,
    pub injected: usize,
    pub errors: usize,
}

/// A port that fails the operations it is told to (before they reach the wrapped port), and
/// counts every call, every injected fault and every error of the wrapped port, per operation:
/// `claim`, `mark_forwarded`, `release`, `put_job_event`, `put_dead_letter`, `keep`. The
/// wrapped port is shared, so that the webhook and the drainer can see one ledger or one bus.
#[derive(Debug)]
pub struct Faulty<P> {
    inner: Arc<P>,
    /// Operation -> how many of its next calls fail (`usize::MAX`: all).
    plan: Mutex<HashMap<&'static str, usize>>,
    counts: Mutex<HashMap<&'static str, OpCounts>>,
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
    pub fn fail_next(self, op: &'static str, n: usize) -> Self {
        self.plan.lock().expect("plan lock").insert(op, n);
        self
    }

    /// Every call of `op` fails.
    pub fn fail_all(self, op: &'static str) -> Self {
        self.fail_next(op, usize::MAX)
    }

    pub fn counts(&self, op: &str) -> OpCounts {
        self.counts
            .lock()
            .expect("counts lock")
            .get(op)
            .copied()
            .unwrap_or_default()
    }

    /// Faults injected and errors of the wrapped port, over every operation.
    pub fn failures(&self) -> usize {
        let counts = self.counts.lock().expect("counts lock");
        counts.values().map(|c| c.injected + c.errors).sum()
    }

    /// Counts the call; `Err` if this one is to fail.
    fn enter(&self, op: &'static str) -> Result<(), PortError> {
        let inject = {
            let mut plan = self.plan.lock().expect("plan lock");
            match plan.get_mut(op) {
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

    fn exit<T>(&self, op: &'static str, result: Result<T, PortError>) -> Result<T, PortError> {
        if result.is_err() {
            let mut counts = self.counts.lock().expect("counts lock");
            counts.entry(op).or_default().errors += 1;
        }
        result
    }
}

impl<L: DeliveryLedger + Send + Sync> DeliveryLedger for Faulty<L> {
    async fn claim(&self, claim: &DeliveryClaim<'_>) -> Result<Claim, PortError> {
        self.enter("claim")?;
        self.exit("claim", self.inner.claim(claim).await)
    }
    async fn mark_forwarded(&self, delivery_id: &str, now_ms: u64) -> Result<(), PortError> {
        self.enter("mark_forwarded")?;
        let result = self.inner.mark_forwarded(delivery_id, now_ms).await;
        self.exit("mark_forwarded", result)
    }
    async fn release(&self, delivery_id: &str) -> Result<(), PortError> {
        self.enter("release")?;
        self.exit("release", self.inner.release(delivery_id).await)
    }
}

impl<S: EventSink + Send + Sync> EventSink for Faulty<S> {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        self.enter("put_job_event")?;
        self.exit("put_job_event", self.inner.put_job_event(event).await)
    }
    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.enter("put_dead_letter")?;
        self.exit("put_dead_letter", self.inner.put_dead_letter(letter).await)
    }
}

impl<Q: FallbackQueue + Send + Sync> FallbackQueue for Faulty<Q> {
    async fn keep(&self, hook: &QueuedHook) -> Result<(), PortError> {
        self.enter("keep")?;
        self.exit("keep", self.inner.keep(hook).await)
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
