//! Kernel mode's background work: the conntrack sweeper and the watcher of the host's
//! addresses and interfaces.
use std::time::Duration;

use futures::StreamExt as _;
use tracing::{debug, warn};

use super::{Dnat, Timeouts};

pub(super) async fn sweeper(dnat: std::sync::Weak<Dnat>, timeouts: Timeouts) {
    let mut tick = tokio::time::interval(timeouts.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(d) = dnat.upgrade() else { return };
        let n = d.sweep(&timeouts);
        if n > 0 {
            debug!(expired = n, "conntrack entries swept");
        }
    }
}

/// Keeps kernel mode in step with the host: re-reads the local addresses, and attaches the
/// TC program to new client-facing interfaces, whenever an address or an interface is
/// added or removed.
pub(super) async fn host_watcher(dnat: std::sync::Weak<Dnat>) {
    use rtnetlink::MulticastGroup;
    let (conn, _handle, mut events) = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ]) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                error = %e,
                "cannot watch the host's addresses and interfaces; kernel mode keeps those it found at start"
            );
            return;
        }
    };
    let conn = tokio::spawn(conn);
    while events.next().await.is_some() {
        // Coalesce a burst (an interface going up brings several addresses).
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
        let Some(d) = dnat.upgrade() else { break };
        if let Err(e) = d.refresh_local().await {
            warn!(error = %e, "cannot refresh local addresses");
        }
        if let Err(e) = d.refresh_interfaces().await {
            warn!(error = %e, "cannot refresh the client-facing interfaces");
        }
    }
    conn.abort();
}
