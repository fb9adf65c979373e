//! The TCP idle timeout: a connection that moves no byte either way for a while is cut.
use std::time::Duration;

use tokio::time::Instant;

use crate::relay::Meter;

/// Completes once `meter` has not moved for `timeout`, checked every quarter of it: a silent
/// connection is cut between `timeout` and 1.25 × `timeout` after its last byte. Coarse on
/// purpose: one timer per connection and quarter-timeout, not per byte.
pub(super) async fn silent_for(meter: &Meter, timeout: Duration) {
    let step = timeout / 4;
    let mut seen = meter.transfer();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = meter.transfer();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= timeout {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Direction;

    #[tokio::test(start_paused = true)]
    async fn fires_only_after_a_whole_timeout_of_silence() {
        let meter = Meter::default();
        let timeout = Duration::from_secs(8);
        let start = Instant::now();
        let idle = silent_for(&meter, timeout);
        tokio::pin!(idle);
        // Traffic every 5 s keeps it alive.
        for _ in 0..4 {
            tokio::select! {
                () = &mut idle => panic!("cut a busy connection"),
                () = tokio::time::sleep(Duration::from_secs(5)) => meter.add(Direction::ToClient, 1),
            }
        }
        let last = Instant::now();
        (&mut idle).await;
        let silent = last.elapsed();
        assert!(
            silent >= timeout && silent <= timeout + timeout / 4,
            "cut after {silent:?} of silence"
        );
        assert!(start.elapsed() > Duration::from_secs(20));
    }
}
