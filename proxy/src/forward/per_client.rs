//! The per-client cap: how many connections one client address may hold on a mapping.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Connections held per client address. Entries go away with their last connection, so the
/// table holds only the clients connected now.
#[derive(Debug)]
pub(super) struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it gives the slot back.
#[derive(Debug)]
pub(super) struct Slot {
    table: Arc<PerClient>,
    client: IpAddr,
}

impl PerClient {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            held: Mutex::default(),
        })
    }

    /// A slot for `client`, or `None` if it already holds `max` connections. An IPv4 client
    /// seen on a dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub(super) fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let client = client.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(client).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            table: self.clone(),
            client,
        })
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_client_on_its_own_and_forgets_clients_that_left() {
        let table = PerClient::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let a1 = table.admit(a).unwrap();
        let _a2 = table.admit(a).unwrap();
        assert!(table.admit(a).is_none(), "a third connection of a");
        // The same client seen through a dual-stack socket is the same client.
        assert!(table.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
        let b1 = table.admit(b).unwrap();
        drop(a1);
        let _a3 = table.admit(a).expect("a slot freed");
        drop(b1);
        assert_eq!(table.clients(), 1, "b left: its entry is gone");
    }
}
