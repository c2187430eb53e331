//! In-memory implementations of the ports, for tests and benchmarks of the decisions, and
//! ([`faults`]) a decorator that injects faults into any of them. Behind the `testing`
//! feature: the functions never compile it.

pub mod faults;
pub use faults::{Faulty, MemoryQueue, Op, OpCounts};

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use crate::hook::JobEvent;
use crate::webhook::{Claim, DeadLetter, DeliveryClaim, DeliveryLedger, EventSink, PortError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    InFlight { lease_until_ms: u64 },
    Forwarded,
}

/// The dedup table's semantics (conditional put with a lease) over a `HashMap`.
#[derive(Debug, Default)]
pub struct InMemoryLedger {
    entries: Mutex<HashMap<String, Entry>>,
}

impl DeliveryLedger for InMemoryLedger {
    async fn claim(&self, claim: &DeliveryClaim<'_>) -> Result<Claim, PortError> {
        let mut entries = self.entries.lock().expect("ledger lock");
        match entries.get(claim.delivery_id) {
            Some(Entry::Forwarded) => Ok(Claim::Forwarded),
            Some(Entry::InFlight { lease_until_ms }) if *lease_until_ms > claim.now_ms => {
                Ok(Claim::InFlight)
            }
            _ => {
                entries.insert(
                    claim.delivery_id.to_owned(),
                    Entry::InFlight {
                        lease_until_ms: claim.lease_until_ms,
                    },
                );
                Ok(Claim::New)
            }
        }
    }

    async fn mark_forwarded(&self, delivery_id: &str, _now_ms: u64) -> Result<(), PortError> {
        let mut entries = self.entries.lock().expect("ledger lock");
        entries.insert(delivery_id.to_owned(), Entry::Forwarded);
        Ok(())
    }

    async fn release(&self, delivery_id: &str) -> Result<(), PortError> {
        let mut entries = self.entries.lock().expect("ledger lock");
        if matches!(entries.get(delivery_id), Some(Entry::InFlight { .. })) {
            entries.remove(delivery_id);
        }
        Ok(())
    }
}

/// Records what would have gone on the bus (wrap it in [`Faulty`] to make puts fail).
#[derive(Debug, Default)]
pub struct RecordingSink {
    job_events: Mutex<Vec<JobEvent>>,
    dead_letters: Mutex<Vec<DeadLetter>>,
}

impl RecordingSink {
    pub fn job_events(&self) -> Vec<JobEvent> {
        self.job_events.lock().expect("sink lock").clone()
    }
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead_letters.lock().expect("sink lock").clone()
    }
}

impl EventSink for RecordingSink {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        self.job_events
            .lock()
            .expect("sink lock")
            .push(event.clone());
        Ok(())
    }
    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.dead_letters
            .lock()
            .expect("sink lock")
            .push(letter.clone());
        Ok(())
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread: enough for the in-memory ports, and it keeps
/// the core crate free of an async runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Secrets that are always there, for tests that are not about loading them.
#[derive(Debug, Clone, Default)]
pub struct StaticSecrets(pub crate::auth::WebhookSecrets);

impl crate::secrets::SecretSource for StaticSecrets {
    async fn load(&self) -> Result<crate::auth::WebhookSecrets, PortError> {
        Ok(self.0.clone())
    }
}

/// The jobs table's conditional moves over a `HashMap`. It records no routes: a pickup's
/// route is unknown.
#[derive(Debug, Default)]
pub struct InMemoryJobs {
    phases: Mutex<HashMap<String, crate::jobs::JobPhase>>,
    picked_up: Mutex<std::collections::HashSet<String>>,
}

impl InMemoryJobs {
    pub fn phase(&self, key: crate::jobs::JobKey) -> Option<crate::jobs::JobPhase> {
        self.phases
            .lock()
            .expect("jobs lock")
            .get(&key.table_key())
            .copied()
    }
}

impl crate::jobs::JobStore for InMemoryJobs {
    async fn advance(
        &self,
        key: crate::jobs::JobKey,
        to: crate::jobs::JobPhase,
        _event: &JobEvent,
        _now_ms: u64,
    ) -> Result<crate::jobs::Advance, PortError> {
        let mut phases = self.phases.lock().expect("jobs lock");
        let entry = phases.get(&key.table_key()).copied();
        match entry {
            Some(current) if current >= to => Ok(crate::jobs::Advance::AlreadyAt(current)),
            from => {
                phases.insert(key.table_key(), to);
                Ok(crate::jobs::Advance::Moved { from })
            }
        }
    }

    async fn record_pickup(
        &self,
        key: crate::jobs::JobKey,
        _event: &JobEvent,
        _now_ms: u64,
    ) -> Result<crate::jobs::PickupRecord, PortError> {
        let first = self
            .picked_up
            .lock()
            .expect("jobs lock")
            .insert(key.table_key());
        Ok(if first {
            crate::jobs::PickupRecord::First(Default::default())
        } else {
            crate::jobs::PickupRecord::Again
        })
    }
}

/// Step Functions' name semantics: a second start with the same name is the same execution.
#[derive(Debug, Default)]
pub struct RecordingWorkflows {
    executions: Mutex<HashMap<String, crate::jobs::WorkflowInput>>,
    starts: AtomicUsize,
}

impl RecordingWorkflows {
    /// Execution names started, each once.
    pub fn executions(&self) -> Vec<String> {
        let mut names: Vec<_> = self
            .executions
            .lock()
            .expect("wf lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }
    /// Start calls, counting repeats.
    pub fn start_calls(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }
}

impl crate::jobs::Workflows for RecordingWorkflows {
    async fn start(
        &self,
        _workflow: crate::jobs::Workflow,
        execution_name: &str,
        input: &crate::jobs::WorkflowInput,
    ) -> Result<crate::jobs::Started, PortError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        let mut executions = self.executions.lock().expect("wf lock");
        if executions.contains_key(execution_name) {
            return Ok(crate::jobs::Started::AlreadyExists);
        }
        executions.insert(execution_name.to_owned(), input.clone());
        Ok(crate::jobs::Started::New)
    }
}

/// A small deterministic generator for shuffles and choices in tests and benchmarks, so a
/// failure reproduces from its seed.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A minimal job event for tests: `job_id` in project 1 with the given status.
pub fn job_event(
    project_id: u64,
    job_id: u64,
    name: &str,
    status: crate::hook::JobStatus,
) -> JobEvent {
    JobEvent {
        schema: crate::hook::JOB_EVENT_SCHEMA,
        delivery_id: format!("d-{project_id}-{job_id}-{status}"),
        received_at_ms: 0,
        job_id,
        job_name: name.to_owned(),
        stage: Some("test".into()),
        status,
        failure_reason: None,
        allow_failure: None,
        retries: 0,
        project_id,
        project_path: Some(format!("group/project-{project_id}")),
        pipeline_id: Some(1),
        git_ref: Some("main".into()),
        tag: Some(false),
        sha: None,
        runner: None,
        created_at: None,
        started_at: None,
        finished_at: None,
        duration_s: None,
        queued_duration_s: None,
    }
}

/// The delivery pattern the router must absorb: for each of `jobs` jobs, a pending event and a
/// random finish (plus a `running` event when `with_running`), each delivered 1-5 times with
/// its own delivery id (as GitLab redeliveries have), all shuffled, so finishes often come
/// before pendings. Deterministic for a seed.
pub fn redelivered_job_events(
    seed: u64,
    project_id: u64,
    jobs: u64,
    with_running: bool,
) -> Vec<JobEvent> {
    use crate::hook::JobStatus;
    let mut rng = XorShift(seed);
    let finishes = [
        JobStatus::Success,
        JobStatus::Failed,
        JobStatus::Canceled,
        JobStatus::Skipped,
    ];
    let mut events = Vec::new();
    for job in 1..=jobs {
        let finish = finishes[rng.below(finishes.len())].clone();
        let mut statuses = vec![JobStatus::Pending];
        if with_running {
            statuses.push(JobStatus::Running);
        }
        statuses.push(finish);
        for status in statuses {
            for copy in 0..=rng.below(5) {
                let mut e = job_event(project_id, job, "build", status.clone());
                e.delivery_id = format!("{}-{copy}", e.delivery_id);
                events.push(e);
            }
        }
    }
    rng.shuffle(&mut events);
    events
}

/// Execution names of the provision workflows a sequential run over `events` must start:
/// one per job whose pending event comes before any of its finishes.
pub fn expected_provisions(events: &[JobEvent]) -> std::collections::BTreeSet<String> {
    let mut finished = std::collections::BTreeSet::new();
    let mut expected = std::collections::BTreeSet::new();
    for e in events {
        let key = crate::jobs::JobKey::of(e);
        if e.status.is_finished() {
            finished.insert(key.job_id);
        } else if e.status == crate::hook::JobStatus::Pending && !finished.contains(&key.job_id) {
            expected.insert(key.execution_name(crate::jobs::Workflow::Provision));
        }
    }
    expected
}
