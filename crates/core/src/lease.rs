//! Named leases: at most one holder of a name at a time, each hold bounded in time, so that
//! scheduled passes (the reaper's; the reconciler's next) never overlap, without Lambda's
//! reserved concurrency (which a new account's concurrency quota cannot spare).
//!
//! A lease is one item in the leases table (key [`ATTR_NAME`]). Taking it is one conditional
//! write whose condition is [`TAKE_CONDITION`], the table's form of [`may_take`]: the name is
//! free, its hold has expired, or the taker already holds it (a retry of the same invocation).
//! A hold lasts until the holder's invocation deadline: Lambda stops an invocation at its
//! deadline, so a holder that died (crash, timeout) cannot act after its lease ends. Giving it
//! back is a delete conditioned on the holder ([`RELEASE_CONDITION`]): a lease taken over
//! after it expired is never released by its former holder.

use std::future::Future;

use crate::webhook::PortError;

/// The item's key: the lease's name (`reaper`, ...).
pub const ATTR_NAME: &str = "lease_name";
/// Who holds it: the invocation's request id.
pub const ATTR_HOLDER: &str = "holder";
/// Until when, ms since the epoch: what [`may_take`] compares.
pub const ATTR_EXPIRES_AT_MS: &str = "expires_at_ms";
/// The same in seconds: the table's TTL attribute (DynamoDB removes expired items within days;
/// only housekeeping, the decision never waits for it).
pub const ATTR_EXPIRES_AT: &str = "expires_at";

/// [`may_take`] as a DynamoDB condition: `#name`, `#holder`, `#expires` stand for
/// [`ATTR_NAME`], [`ATTR_HOLDER`], [`ATTR_EXPIRES_AT_MS`]; `:now` and `:holder` are the
/// taker's clock and id.
pub const TAKE_CONDITION: &str =
    "attribute_not_exists(#name) OR #expires <= :now OR #holder = :holder";
/// Release only one's own hold.
pub const RELEASE_CONDITION: &str = "#holder = :holder";

/// The name of the reaper's lease.
pub const REAPER_LEASE: &str = "reaper";
/// The reconciler's lease name (the template's HoldReconcilerLease allows only this key).
pub const RECONCILER_LEASE: &str = "reconciler";

/// Used when the invocation's deadline is unknown or already past (a local runtime that sends
/// a duration instead of a deadline): the longest Lambda invocation.
pub const FALLBACK_HOLD_MS: u64 = 15 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub expires_at_ms: u64,
}

impl Lease {
    /// The hold `holder` asks for: until its invocation's `deadline_ms`, after which it cannot
    /// act. A deadline that is not in the future means the runtime did not say: then the
    /// longest an invocation can run.
    pub fn until_deadline(name: &str, holder: &str, now_ms: u64, deadline_ms: u64) -> Self {
        let expires_at_ms = if deadline_ms > now_ms {
            deadline_ms
        } else {
            now_ms.saturating_add(FALLBACK_HOLD_MS)
        };
        Self {
            name: name.to_owned(),
            holder: holder.to_owned(),
            expires_at_ms,
        }
    }
}

/// Whether `holder` may take the lease now, given the table's current hold of it.
pub fn may_take(current: Option<&Lease>, holder: &str, now_ms: u64) -> bool {
    match current {
        None => true,
        Some(held) => held.expires_at_ms <= now_ms || held.holder == holder,
    }
}

/// The leases table.
pub trait Leases {
    /// Takes `lease` if [`may_take`] allows it (one conditional write): `Ok(None)` when taken,
    /// `Ok(Some(current))` with the hold that refused it.
    fn take(
        &self,
        lease: &Lease,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<Lease>, PortError>> + Send;
    /// Gives the lease back if `holder` still holds it; someone else's hold is left alone.
    fn release(
        &self,
        name: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// What [`with_lease`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseRun<T> {
    /// Held the lease and ran the work; `released` is the result of giving it back (a failed
    /// release only delays the next holder until the hold expires).
    Ran {
        output: T,
        released: Result<(), PortError>,
    },
    /// Someone else holds it: the work did not run.
    Held(Lease),
}

/// Runs `work` only while holding `lease`, and gives the lease back afterwards.
pub async fn with_lease<L: Leases, T, F: Future<Output = T>>(
    leases: &L,
    lease: &Lease,
    now_ms: u64,
    work: impl FnOnce() -> F,
) -> Result<LeaseRun<T>, PortError> {
    if let Some(current) = leases.take(lease, now_ms).await? {
        return Ok(LeaseRun::Held(current));
    }
    let output = work().await;
    let released = leases.release(&lease.name, &lease.holder).await;
    Ok(LeaseRun::Ran { output, released })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::block_on;
    use std::sync::Mutex;

    /// The table, in memory: [`may_take`] decides, as the condition does in DynamoDB.
    #[derive(Default)]
    struct Table(Mutex<Option<Lease>>);

    impl Leases for Table {
        async fn take(&self, lease: &Lease, now_ms: u64) -> Result<Option<Lease>, PortError> {
            let mut held = self.0.lock().unwrap();
            if may_take(held.as_ref(), &lease.holder, now_ms) {
                *held = Some(lease.clone());
                Ok(None)
            } else {
                Ok(held.clone())
            }
        }
        async fn release(&self, _name: &str, holder: &str) -> Result<(), PortError> {
            let mut held = self.0.lock().unwrap();
            if held.as_ref().is_some_and(|l| l.holder == holder) {
                *held = None;
            }
            Ok(())
        }
    }

    fn lease(holder: &str, until: u64) -> Lease {
        Lease {
            name: REAPER_LEASE.into(),
            holder: holder.into(),
            expires_at_ms: until,
        }
    }

    #[test]
    fn a_lease_is_taken_when_free_expired_or_already_ours() {
        assert!(may_take(None, "a", 0));
        let held = lease("a", 1_000);
        assert!(!may_take(Some(&held), "b", 999), "held by a until 1000");
        assert!(may_take(Some(&held), "b", 1_000), "expired at its deadline");
        assert!(may_take(Some(&held), "a", 500), "a retry of the holder");
    }

    #[test]
    fn the_hold_ends_at_the_deadline_or_after_the_longest_invocation() {
        let l = Lease::until_deadline("reaper", "req-1", 10_000, 310_000);
        assert_eq!((l.expires_at_ms, l.holder.as_str()), (310_000, "req-1"));
        // A runtime that sent a duration (or nothing): the longest an invocation can run.
        let l = Lease::until_deadline("reaper", "req-1", 10_000, 300_000 - 290_000);
        assert_eq!(l.expires_at_ms, 10_000 + FALLBACK_HOLD_MS);
    }

    #[test]
    fn one_holder_at_a_time_on_a_fake_clock() {
        let table = Table::default();
        let ran = std::cell::Cell::new(0);
        let work = || async { ran.set(ran.get() + 1) };
        // a takes it at t=0 until t=300; b at t=100 is refused and names a's hold.
        block_on(async {
            let a = lease("a", 300);
            assert!(table.take(&a, 0).await.unwrap().is_none());
            let refused = with_lease(&table, &lease("b", 400), 100, work)
                .await
                .unwrap();
            assert_eq!(refused, LeaseRun::Held(a.clone()));
            assert_eq!(ran.get(), 0);
            // a died without releasing: at t=300 its hold is over, and b takes it, runs, and
            // gives it back; a's late release (it cannot happen: a is dead) would not free b's.
            let b = lease("b", 600);
            let done = with_lease(&table, &b, 300, work).await.unwrap();
            assert!(matches!(
                done,
                LeaseRun::Ran {
                    released: Ok(()),
                    ..
                }
            ));
            assert_eq!(ran.get(), 1);
            assert_eq!(*table.0.lock().unwrap(), None, "released after the work");
            assert!(table.take(&b, 300).await.unwrap().is_none());
            table.release("reaper", "a").await.unwrap();
            assert_eq!(table.0.lock().unwrap().as_ref(), Some(&b));
        });
    }
}
