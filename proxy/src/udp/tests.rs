//! Flow-table behaviour under tokio's paused clock: no sleeps, no sockets.
use std::time::Duration;

use tokio::time::{Instant, advance};

use super::FlowTable;
use crate::addr::ClientAddr;

fn client(port: u16) -> ClientAddr {
    ClientAddr(([10, 0, 0, 1], port).into())
}

#[tokio::test(start_paused = true)]
async fn idle_flows_expire_and_traffic_keeps_them_alive() {
    let mut t = FlowTable::new(10, Duration::from_secs(90));
    t.insert(client(1), "a", Instant::now());
    t.insert(client(2), "b", Instant::now());
    advance(Duration::from_secs(60)).await;
    assert!(
        t.touch(client(2), Instant::now()).is_some(),
        "b sends: refreshed"
    );
    assert!(
        t.expire(Instant::now()).is_empty(),
        "nothing is 90 s idle yet"
    );
    assert_eq!(
        t.next_expiry(),
        Some(Instant::now() + Duration::from_secs(30)),
        "a expires first"
    );
    advance(Duration::from_secs(30)).await;
    assert_eq!(t.expire(Instant::now()), vec![(client(1), "a")]);
    advance(Duration::from_secs(59)).await;
    assert!(
        t.expire(Instant::now()).is_empty(),
        "b was refreshed at 60 s"
    );
    advance(Duration::from_secs(1)).await;
    assert_eq!(t.expire(Instant::now()), vec![(client(2), "b")]);
    assert!(t.is_empty() && t.next_expiry().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_full_table_evicts_the_least_recently_used_flow() {
    let mut t = FlowTable::new(2, Duration::from_secs(90));
    t.insert(client(1), 1, Instant::now());
    advance(Duration::from_secs(1)).await;
    t.insert(client(2), 2, Instant::now());
    advance(Duration::from_secs(1)).await;
    t.touch(client(1), Instant::now()); // now 2 is the least recently used
    let evicted = t.insert(client(3), 3, Instant::now());
    assert_eq!(evicted, Some((client(2), 2)));
    assert_eq!((t.len(), t.evicted()), (2, 1));
    // Re-inserting an existing client replaces it and evicts nobody.
    assert_eq!(t.insert(client(3), 33, Instant::now()), None);
    assert_eq!(t.touch(client(3), Instant::now()).copied(), Some(33));
    assert_eq!(t.evicted(), 1);
}

#[tokio::test(start_paused = true)]
async fn same_instant_entries_stay_distinct() {
    // Many flows created at one instant must all be tracked and all expire.
    let mut t = FlowTable::new(1000, Duration::from_secs(5));
    let now = Instant::now();
    for p in 0..500 {
        t.insert(client(p), p, now);
    }
    assert_eq!(t.len(), 500);
    advance(Duration::from_secs(5)).await;
    assert_eq!(t.expire(Instant::now()).len(), 500);
    assert!(t.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_client_spraying_source_ports_replaces_only_its_own_flows() {
    let max = 64;
    let mut t = FlowTable::new(max, Duration::from_secs(90));
    let legit: Vec<ClientAddr> = (1..=10)
        .map(|i| ClientAddr(([10, 0, 1, i], 5353).into()))
        .collect();
    for &c in &legit {
        t.insert(c, 0, Instant::now());
    }
    // The sprayer's flows are always the most recent: plain LRU would evict every
    // legitimate flow within 64 datagrams.
    let mut evicted_legit = 0;
    for port in 0..10_000 {
        advance(Duration::from_millis(1)).await;
        if let Some((gone, _)) = t.insert(client(port), 1, Instant::now()) {
            evicted_legit += usize::from(legit.contains(&gone));
        }
    }
    assert_eq!(evicted_legit, 0);
    assert!(legit.iter().all(|&c| t.touch(c, Instant::now()).is_some()));
    assert_eq!(t.len(), max, "the sprayer filled the rest and churns in it");
    // A new address still gets in (evicting the table's least recently used flow, a
    // sprayer's): the table is full, not closed.
    let newcomer = ClientAddr(([10, 0, 2, 1], 1).into());
    let (gone, _) = t.insert(newcomer, 0, Instant::now()).unwrap();
    assert_eq!(gone.get().ip(), client(0).get().ip());
    assert!(t.share() == max / 2);
}
