//! One kernel-mode mapping: its service entry, and everything of it that goes when it does.
use std::sync::Arc;

use berth_common::dnat::{BACKEND_DRAINING, Backend, ServiceKey};
use tracing::info;

use super::{Dnat, Snapshot};

/// One kernel-mode mapping. Dropping it deletes its service entry, its conntrack and
/// local-socket entries and its counters.
pub struct DnatMapping {
    pub(super) dnat: Arc<Dnat>,
    pub(super) key: ServiceKey,
    pub(super) backend: Backend,
}

impl std::fmt::Debug for DnatMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnatMapping")
            .field("id", &self.backend.id)
            .finish_non_exhaustive()
    }
}

impl DnatMapping {
    /// Stops mapping new flows and local connects; flows with a conntrack entry go on.
    pub fn drain(&self) {
        // Handed over: the successor maps new flows with this very entry.
        if self.dnat.leaving() {
            return;
        }
        let mut inner = self.dnat.lock();
        // The entry as it is now (its interface may have changed since it was added).
        if let Ok(mut b) = inner.maps.services.get(&self.key, 0)
            && b.id == self.backend.id
        {
            b.flags |= BACKEND_DRAINING;
            let _ = inner.maps.services.insert(self.key, b, 0);
        }
    }

    /// The mapping's counters.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.dnat.lock();
        let mut s = Snapshot {
            conntrack_entries: inner.entries.get(&self.backend.id).copied().unwrap_or(0),
            ..Snapshot::default()
        };
        if let Ok(per_cpu) = inner.maps.stats.get(&self.backend.id, 0) {
            for c in per_cpu.iter() {
                s.flows += c.flows;
                s.local_rewrites += c.local_rewrites;
                s.packets_in += c.packets_in;
                s.bytes_in += c.bytes_in;
                s.packets_out += c.packets_out;
                s.bytes_out += c.bytes_out;
                s.too_big += c.too_big;
            }
        }
        s
    }
}

impl Drop for DnatMapping {
    fn drop(&mut self) {
        // A hand-over leaves the entries to the successor, which adopts them.
        if self.dnat.leaving() {
            return;
        }
        let id = self.backend.id;
        let mut inner = self.dnat.lock();
        if inner.owns(&self.key, id) {
            let _ = inner.maps.services.remove(&self.key);
        }
        inner.forget(id);
        info!(id, "kernel-mode mapping removed");
    }
}
