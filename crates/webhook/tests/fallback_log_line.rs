//! The intake fallback's log line, alone in its test binary: tracing caches each log
//! call site's interest process-wide, and a call site first reached by a parallel test with no
//! subscriber can hide the line from this test's scoped subscriber.

use std::io;
use std::sync::{Arc, Mutex};

use ephemeral_core::testing::{Faulty, MemoryQueue, Op};
use ephemeral_core::testing::{InMemoryLedger, RecordingSink, block_on};
use ephemeral_core::webhook::Outcome;
use webhook::metric_name;

mod common;
use common::*;

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<u8>>>);

impl io::Write for Memory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The fallback's log line is keyed like the others (project, pipeline, job, delivery id) and
/// says why; its metric is `IntakeFallbacks`.
#[test]
fn a_fallback_logs_the_job_and_the_reason_and_counts_intake_fallbacks() {
    let memory = Memory::default();
    let writer = memory.clone();
    let subscriber = ephemeral_aws::json_subscriber(tracing::Level::INFO, move || writer.clone());
    let ledger = Faulty::new(InMemoryLedger::default()).fail_all(Op::Claim);
    let hook = webhook(
        ledger,
        Faulty::new(RecordingSink::default()),
        Faulty::new(MemoryQueue::default()),
    );
    let reply = tracing::subscriber::with_default(subscriber, || {
        block_on(hook.handle_at(request(HOOK, "d-9"), NOW_MS))
    });
    assert_eq!(reply.status_code, 202);
    let text = String::from_utf8(memory.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let line = lines
        .iter()
        .find(|l| l["decision"] == "queued")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["delivery_id"], "d-9");
    assert_eq!(line["project_id"], 31537070);
    assert_eq!(line["pipeline_id"], 743121198);
    assert_eq!(line["job_id"], 3580121225u64);
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("injected fault in claim"),
        "{line}"
    );
    assert!(!text.contains(TOKEN));
    assert_eq!(
        metric_name(&Outcome::Queued(String::new())),
        "IntakeFallbacks"
    );
    assert_eq!(
        metric_name(&Outcome::DeadLetterQueued {
            reason: String::new(),
            failure: String::new()
        }),
        "IntakeFallbacks"
    );
}
