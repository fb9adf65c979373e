//! The UDP flow table: one entry per client address, refreshed by traffic in either
//! direction, expired after an idle timeout, and bounded in size.
//!
//! When the table is full, a new client evicts a flow (and the eviction is counted): a full
//! table keeps serving new clients rather than refusing them. Which flow goes is what keeps
//! one address from taking the table from everyone: an address that already holds half the
//! table (its "share") gives up its own least recently used flow; any other address evicts
//! the least recently used flow of the table. So a client spraying datagrams from new source
//! ports churns through its own half, and the flows of other addresses stay. Time is passed
//! in, never read here.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use tokio::time::Instant;

use crate::addr::ClientAddr;

/// docker-proxy's UDP idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
struct Entry<V> {
    value: V,
    last_seen: Instant,
    /// Tie-breaker for equal instants, so that `order` keys are unique.
    seq: u64,
}

/// (last_seen, seq, client): sorted, the first element is the least recently used flow.
type Key = (Instant, u64, ClientAddr);

/// Flows keyed by client address, with LRU order kept in sorted indexes (O(log n) per touch),
/// one for the table and one per client IP address.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<ClientAddr, Entry<V>>,
    order: BTreeSet<Key>,
    by_ip: HashMap<IpAddr, BTreeSet<Key>>,
    max_flows: usize,
    idle_timeout: Duration,
    next_seq: u64,
    evicted: u64,
}

impl<V> FlowTable<V> {
    /// A table of at most `max_flows` (at least 1) flows that expire after `idle_timeout`.
    pub fn new(max_flows: usize, idle_timeout: Duration) -> Self {
        Self {
            flows: HashMap::new(),
            order: BTreeSet::new(),
            by_ip: HashMap::new(),
            max_flows: max_flows.max(1),
            idle_timeout,
            next_seq: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// How many flows one IP address may hold before its new flows replace its own.
    pub fn share(&self) -> usize {
        (self.max_flows / 2).max(1)
    }

    /// Flows evicted to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The flow of `client`, refreshed as seen at `now`.
    pub fn touch(&mut self, client: ClientAddr, now: Instant) -> Option<&mut V> {
        let seq = self.bump();
        let entry = self.flows.get_mut(&client)?;
        let old = (entry.last_seen, entry.seq, client);
        entry.last_seen = now;
        entry.seq = seq;
        Self::unindex(&mut self.order, &mut self.by_ip, old);
        Self::index(&mut self.order, &mut self.by_ip, (now, seq, client));
        Some(&mut entry.value)
    }

    /// Adds a flow for `client`, replacing any it had. If the table was full, a flow is
    /// evicted (see the module's documentation) and returned so that the caller can close its
    /// socket.
    pub fn insert(
        &mut self,
        client: ClientAddr,
        value: V,
        now: Instant,
    ) -> Option<(ClientAddr, V)> {
        let replaced = self.remove(client);
        let evicted = if replaced.is_none() && self.flows.len() >= self.max_flows {
            let own = self
                .by_ip
                .get(&ip(client))
                .filter(|flows| flows.len() >= self.share());
            let lru = own.unwrap_or(&self.order).iter().next().map(|&(_, _, c)| c);
            let out = lru.and_then(|c| self.remove(c).map(|v| (c, v)));
            if out.is_some() {
                self.evicted += 1;
            }
            out
        } else {
            None
        };
        let seq = self.bump();
        Self::index(&mut self.order, &mut self.by_ip, (now, seq, client));
        self.flows.insert(
            client,
            Entry {
                value,
                last_seen: now,
                seq,
            },
        );
        evicted
    }

    /// Removes `client`'s flow.
    pub fn remove(&mut self, client: ClientAddr) -> Option<V> {
        let entry = self.flows.remove(&client)?;
        Self::unindex(
            &mut self.order,
            &mut self.by_ip,
            (entry.last_seen, entry.seq, client),
        );
        Some(entry.value)
    }

    fn index(order: &mut BTreeSet<Key>, by_ip: &mut HashMap<IpAddr, BTreeSet<Key>>, key: Key) {
        order.insert(key);
        by_ip.entry(ip(key.2)).or_default().insert(key);
    }

    fn unindex(order: &mut BTreeSet<Key>, by_ip: &mut HashMap<IpAddr, BTreeSet<Key>>, key: Key) {
        order.remove(&key);
        let ip = ip(key.2);
        if let Some(flows) = by_ip.get_mut(&ip) {
            flows.remove(&key);
            if flows.is_empty() {
                by_ip.remove(&ip);
            }
        }
    }

    /// Removes and returns every flow idle for at least the timeout at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(ClientAddr, V)> {
        let mut out = Vec::new();
        while let Some(&(seen, _, client)) = self.order.iter().next() {
            if now.saturating_duration_since(seen) < self.idle_timeout {
                break;
            }
            if let Some(v) = self.remove(client) {
                out.push((client, v));
            }
        }
        out
    }

    /// When the next flow will expire if nothing refreshes it, for the caller's timer.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.order
            .iter()
            .next()
            .map(|&(seen, _, _)| seen + self.idle_timeout)
    }

    fn bump(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// The address a client is counted under (an IPv4 client on a dual-stack socket as IPv4).
fn ip(client: ClientAddr) -> IpAddr {
    client.get().ip().to_canonical()
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
