//! What each consumer of a transport is doing right now, for readiness
//! checks: whether it is registered on the broker (and if not, why), and
//! which deliveries it holds unfinished and since when.
//!
//! The transport marks a consumer registered when the broker accepted its
//! subscription and lost when the subscription ended (channel or connection
//! closed, queue deleted, consumer cancelled by the broker). The
//! [`Consumer`](crate::consumer::Consumer) marks each delivery it starts and
//! finishes. A consumer is **stalled** when it has held one delivery
//! unfinished for longer than the stall threshold: a handler hung on a lock,
//! a database that never answers, or a retry loop that never ends.
//!
//! Times are `std::time::Instant`s passed in by the caller, so the rules
//! are tested without waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The consumers of one transport. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct ConsumerRegistry {
    inner: Arc<Mutex<BTreeMap<String, Entry>>>,
}

#[derive(Debug, Default)]
struct Entry {
    registered: bool,
    /// Why the consumer is not registered (last error or loss).
    reason: Option<String>,
    /// When `registered` last changed.
    since: Option<Instant>,
    /// Deliveries taken and not finished: id -> when taken.
    in_flight: BTreeMap<u64, Instant>,
    next_id: u64,
    /// Deliveries finished (any outcome).
    finished: u64,
    /// When the last delivery was taken.
    last_taken: Option<Instant>,
}

/// One consumer's state at a moment, as readiness reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSnapshot {
    /// The consumer's name (its consumer tag).
    pub name: String,
    /// The broker has accepted its subscription and not cancelled it.
    pub registered: bool,
    /// Why it is not registered, when it is not.
    pub reason: Option<String>,
    /// For how long it has been (un)registered.
    pub for_duration: Option<Duration>,
    /// Deliveries it holds unfinished.
    pub in_flight: usize,
    /// How long the oldest unfinished delivery has been held.
    pub oldest_in_flight: Option<Duration>,
    /// Deliveries finished since start.
    pub finished: u64,
}

impl ConsumerSnapshot {
    /// Held one delivery unfinished for longer than `threshold`.
    pub fn stalled(&self, threshold: Duration) -> bool {
        self.oldest_in_flight.is_some_and(|held| held > threshold)
    }
}

/// Marks a delivery finished when dropped (whatever became of it).
#[derive(Debug)]
pub struct InFlight {
    registry: ConsumerRegistry,
    consumer: String,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if let Some(entry) = map.get_mut(&self.consumer) {
            entry.in_flight.remove(&self.id);
            entry.finished += 1;
        }
    }
}

impl ConsumerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Plain counters and maps: a panic elsewhere cannot leave them in a
        // state worth refusing to read.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The broker accepted `consumer`'s subscription at `now`.
    pub fn registered(&self, consumer: &str, now: Instant) {
        let mut map = self.lock();
        let entry = map.entry(consumer.to_owned()).or_default();
        entry.registered = true;
        entry.reason = None;
        entry.since = Some(now);
    }

    /// `consumer`'s subscription is gone (or could not be made) at `now`.
    pub fn lost(&self, consumer: &str, reason: impl Into<String>, now: Instant) {
        let mut map = self.lock();
        let entry = map.entry(consumer.to_owned()).or_default();
        if entry.registered || entry.since.is_none() {
            entry.since = Some(now);
        }
        entry.registered = false;
        entry.reason = Some(reason.into());
    }

    /// Every consumer is gone (the transport was closed).
    pub fn lost_all(&self, reason: &str, now: Instant) {
        let mut map = self.lock();
        for entry in map.values_mut() {
            if entry.registered {
                entry.since = Some(now);
            }
            entry.registered = false;
            entry.reason = Some(reason.to_owned());
        }
    }

    /// `consumer` took a delivery at `now`; dropping the guard finishes it.
    pub fn taken(&self, consumer: &str, now: Instant) -> InFlight {
        let mut map = self.lock();
        let entry = map.entry(consumer.to_owned()).or_default();
        let id = entry.next_id;
        entry.next_id += 1;
        entry.in_flight.insert(id, now);
        entry.last_taken = Some(now);
        InFlight {
            registry: self.clone(),
            consumer: consumer.to_owned(),
            id,
        }
    }

    /// `consumer`'s state at `now`, or `None` if it never subscribed.
    pub fn snapshot(&self, consumer: &str, now: Instant) -> Option<ConsumerSnapshot> {
        let map = self.lock();
        map.get(consumer).map(|entry| ConsumerSnapshot {
            name: consumer.to_owned(),
            registered: entry.registered,
            reason: entry.reason.clone(),
            for_duration: entry.since.map(|s| now.saturating_duration_since(s)),
            in_flight: entry.in_flight.len(),
            oldest_in_flight: entry
                .in_flight
                .values()
                .min()
                .map(|t| now.saturating_duration_since(*t)),
            finished: entry.finished,
        })
    }

    /// Every consumer seen so far, by name.
    pub fn snapshots(&self, now: Instant) -> Vec<ConsumerSnapshot> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        names.iter().filter_map(|n| self.snapshot(n, now)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_registered_until_lost_and_says_why() {
        let registry = ConsumerRegistry::new();
        let t0 = Instant::now();
        assert_eq!(registry.snapshot("saga", t0), None);
        registry.lost("saga", "queue missing", t0);
        let s = registry.snapshot("saga", t0).expect("known");
        assert!(!s.registered);
        assert_eq!(s.reason.as_deref(), Some("queue missing"));
        registry.registered("saga", t0 + Duration::from_secs(1));
        let s = registry
            .snapshot("saga", t0 + Duration::from_secs(3))
            .expect("known");
        assert!(s.registered);
        assert_eq!(s.reason, None);
        assert_eq!(s.for_duration, Some(Duration::from_secs(2)));
        registry.lost_all("transport closed", t0 + Duration::from_secs(4));
        let s = registry
            .snapshot("saga", t0 + Duration::from_secs(4))
            .expect("known");
        assert!(!s.registered);
        assert_eq!(s.reason.as_deref(), Some("transport closed"));
    }

    #[test]
    fn a_delivery_held_longer_than_the_threshold_is_a_stall() {
        let registry = ConsumerRegistry::new();
        let t0 = Instant::now();
        registry.registered("saga", t0);
        let old = registry.taken("saga", t0);
        let new = registry.taken("saga", t0 + Duration::from_secs(50));
        let at = t0 + Duration::from_secs(61);
        let s = registry.snapshot("saga", at).expect("known");
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.oldest_in_flight, Some(Duration::from_secs(61)));
        assert!(s.stalled(Duration::from_secs(60)));
        assert!(!s.stalled(Duration::from_secs(61)));
        drop(old);
        let s = registry.snapshot("saga", at).expect("known");
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.finished, 1);
        assert!(!s.stalled(Duration::from_secs(60)));
        drop(new);
        let s = registry.snapshot("saga", at).expect("known");
        assert_eq!((s.in_flight, s.finished, s.oldest_in_flight), (0, 2, None));
    }
}
