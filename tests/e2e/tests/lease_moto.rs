//! The leases table (fleet::lease::DynamoLeases) against moto's DynamoDB: the conditional
//! write decides exactly as `ephemeral_core::lease::may_take` does, and of passes that start
//! together exactly one runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use e2e_tests::{create_table, scan_items, sdk_config};
use ephemeral_core::lease::{Lease, LeaseRun, Leases, may_take, with_lease};
use fleet::lease::DynamoLeases;

async fn leases() -> (DynamoLeases, String) {
    let sdk = sdk_config();
    let table = create_table(&sdk, "leases", "lease_name", None).await;
    (
        DynamoLeases {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table: table.clone(),
        },
        table,
    )
}

fn lease(name: &str, holder: &str, until: u64) -> Lease {
    Lease {
        name: name.into(),
        holder: holder.into(),
        expires_at_ms: until,
    }
}

#[tokio::test]
async fn the_table_decides_as_the_core_does() {
    let (table, _) = leases().await;
    // (current hold, taker, now): every case of may_take, against the table.
    let cases = [
        (None, "a", 0),
        (Some(lease("x", "a", 1_000)), "b", 999),
        (Some(lease("x", "a", 1_000)), "b", 1_000),
        (Some(lease("x", "a", 1_000)), "a", 500),
    ];
    for (n, (current, taker, now)) in cases.into_iter().enumerate() {
        let name = format!("case-{n}");
        if let Some(held) = &current {
            let held = Lease {
                name: name.clone(),
                ..held.clone()
            };
            assert_eq!(table.take(&held, 0).await.unwrap(), None);
        }
        let want = lease(&name, taker, now + 300);
        let got = table.take(&want, now).await.unwrap();
        assert_eq!(
            got.is_none(),
            may_take(current.as_ref(), taker, now),
            "case {n}: {got:?}"
        );
        if let (Some(refused), Some(held)) = (&got, &current) {
            assert_eq!(
                (refused.holder.as_str(), refused.expires_at_ms),
                (held.holder.as_str(), held.expires_at_ms),
                "the refusal names the hold"
            );
        }
    }
}

#[tokio::test]
async fn only_the_holder_releases_and_the_ttl_attribute_is_in_seconds() {
    let (table, name) = leases().await;
    let held = lease("reaper", "a", 1_700_000_000_500);
    assert_eq!(table.take(&held, 0).await.unwrap(), None);
    let items = scan_items(&sdk_config(), &name).await;
    assert_eq!(
        items[0]["expires_at"],
        aws_sdk_dynamodb::types::AttributeValue::N("1700000001".into())
    );
    table.release("reaper", "b").await.unwrap();
    assert_eq!(
        scan_items(&sdk_config(), &name).await.len(),
        1,
        "b is not the holder"
    );
    table.release("reaper", "a").await.unwrap();
    assert!(scan_items(&sdk_config(), &name).await.is_empty());
    // Releasing what is gone is fine (a retry).
    table.release("reaper", "a").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_eight_passes_started_together_one_runs() {
    let (table, name) = leases().await;
    let ran = AtomicUsize::new(0);
    let now = fleet::now_ms();
    let passes = (0..8).map(|n| {
        let (table, ran) = (&table, &ran);
        async move {
            let work = || async {
                ran.fetch_add(1, Ordering::SeqCst);
                // Long enough that every other pass tries while this one holds the lease.
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            with_lease(
                table,
                &lease("reaper", &format!("request-{n}"), now + 60_000),
                now,
                work,
            )
            .await
            .unwrap()
        }
    });
    let runs = futures_util::future::join_all(passes).await;
    let held = runs
        .iter()
        .filter(|r| matches!(r, LeaseRun::Held(_)))
        .count();
    assert_eq!((ran.load(Ordering::SeqCst), held), (1, 7));
    assert!(runs.iter().any(|r| matches!(
        r,
        LeaseRun::Ran {
            released: Ok(()),
            ..
        }
    )));
    assert!(
        scan_items(&sdk_config(), &name).await.is_empty(),
        "released"
    );
}
