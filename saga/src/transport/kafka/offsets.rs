//! Which offset a subscription may commit, per partition, when deliveries
//! are settled out of order.
//!
//! Kafka commits are positional: committing offset `n` on a partition says
//! "every message below `n` is done". The consumer settles up to `prefetch`
//! deliveries concurrently, in any order, so a commit must never pass a
//! delivery that is still out. Per partition the tracker keeps the offsets
//! handed out and not yet acknowledged; the commit position is the lowest of
//! them (or, with none out, one past the last offset received). Offsets are
//! compared in the order they were received, not assumed to be contiguous
//! integers (compaction and transaction markers leave gaps in a log).
//!
//! A delivery handed back (`requeue`) or dropped unsettled stays "out": the
//! partition's commit position stays below it, so after a restart or a
//! rebalance the group reads it (and whatever followed it) again.
//!
//! Partitions revoked by a rebalance are forgotten; each assignment starts an
//! *epoch*, and a settlement that names an older epoch is refused: its
//! partition may already be read by another member, which will deliver the
//! message again (the inbox makes that a no-op).
//!
//! Pure bookkeeping: no I/O, no clock, tested below.

use std::collections::{BTreeSet, HashMap};

/// A topic and partition.
pub(crate) type PartitionKey = (String, i32);

/// Names one delivery for its settlement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    epoch: u64,
}

/// The tracker's answer to "may this ticket be settled?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Recorded; commit this offset (the partition's new position) now.
    Commit(i64),
    /// Recorded; nothing new to commit (an earlier delivery is still out, or
    /// the position is already committed).
    Nothing,
    /// The partition was revoked (or reassigned) since the delivery: nothing
    /// recorded; the message will be delivered again by its new owner.
    Revoked,
}

#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    /// Offsets delivered and not acknowledged (handed back ones included).
    out: BTreeSet<i64>,
    /// One past the last offset received in this epoch.
    next: Option<i64>,
    /// The last position committed (or being committed) in this epoch;
    /// at first, the offset the epoch started reading at.
    committed: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.out.first().copied().or(self.next)
    }
}

/// Per-partition delivery bookkeeping of one subscription.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<PartitionKey, PartitionState>,
    /// Highest offset ever received per partition (across epochs): a
    /// message at or below it is a redelivery.
    seen: HashMap<PartitionKey, i64>,
    next_epoch: u64,
}

impl OffsetTracker {
    /// The group assigned `partition` of `topic` to this member: start fresh.
    pub(crate) fn assigned(&mut self, topic: &str, partition: i32) {
        self.next_epoch += 1;
        self.partitions.insert(
            (topic.to_owned(), partition),
            PartitionState {
                epoch: self.next_epoch,
                out: BTreeSet::new(),
                next: None,
                committed: None,
            },
        );
    }

    /// The partition was revoked: forget its deliveries.
    pub(crate) fn revoked(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }

    /// Whether `partition` of `topic` is assigned now.
    #[cfg(test)]
    pub(crate) fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.partitions.contains_key(&(topic.to_owned(), partition))
    }

    /// A message was received: it is out until settled. `None` when its
    /// partition is not assigned (a message fetched before a revocation):
    /// it must not be handed out. The flag says whether this process
    /// received this offset before (a redelivery).
    pub(crate) fn received(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Option<(Ticket, bool)> {
        let key = (topic.to_owned(), partition);
        let state = self.partitions.get_mut(&key)?;
        if state.next.is_none() {
            // Where this epoch started reading: the group's committed
            // position (or where `auto.offset.reset` put it). Nothing to
            // commit until the position moves past it.
            state.committed = Some(offset);
        }
        state.out.insert(offset);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let ticket = Ticket {
            topic: key.0.clone(),
            partition,
            offset,
            epoch: state.epoch,
        };
        let redelivered = match self.seen.get_mut(&key) {
            Some(highest) if *highest >= offset => true,
            Some(highest) => {
                *highest = offset;
                false
            }
            None => {
                self.seen.insert(key, offset);
                false
            }
        };
        Some((ticket, redelivered))
    }

    fn current(&mut self, ticket: &Ticket) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(&(ticket.topic.clone(), ticket.partition))
            .filter(|state| state.epoch == ticket.epoch)
    }

    /// The delivery was acknowledged: it is no longer out.
    pub(crate) fn acked(&mut self, ticket: &Ticket) -> Settled {
        match self.current(ticket) {
            Some(state) => {
                state.out.remove(&ticket.offset);
                Settled::Nothing
            }
            None => Settled::Revoked,
        }
    }

    /// What to commit now for `ticket`'s partition: its position when that
    /// moved past the last commit. Marks it committed (the caller commits it
    /// and calls [`Self::commit_failed`] if that fails).
    pub(crate) fn next_commit(&mut self, ticket: &Ticket) -> Settled {
        let Some(state) = self.current(ticket) else {
            return Settled::Revoked;
        };
        match state.position() {
            Some(position) if state.committed.is_none_or(|c| position > c) => {
                state.committed = Some(position);
                Settled::Commit(position)
            }
            _ => Settled::Nothing,
        }
    }

    /// Committing `position` for `ticket`'s partition failed: the next
    /// settlement tries again.
    pub(crate) fn commit_failed(&mut self, ticket: &Ticket, position: i64) {
        if let Some(state) = self.current(ticket)
            && state.committed == Some(position)
        {
            state.committed = None;
        }
    }

    /// Deliveries out (unsettled or handed back), over every partition.
    #[cfg(test)]
    pub(crate) fn out(&self) -> usize {
        self.partitions.values().map(|s| s.out.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(tracker: &mut OffsetTracker, offsets: &[i64]) -> Vec<Ticket> {
        offsets
            .iter()
            .map(|&o| tracker.received("t", 0, o).expect("assigned").0)
            .collect()
    }

    fn ack(tracker: &mut OffsetTracker, ticket: &Ticket) -> Settled {
        match tracker.acked(ticket) {
            Settled::Revoked => Settled::Revoked,
            _ => tracker.next_commit(ticket),
        }
    }

    #[test]
    fn in_order_acks_commit_one_past_each_message() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[10, 11, 12]);
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Commit(11));
        assert_eq!(ack(&mut tracker, &t[1]), Settled::Commit(12));
        assert_eq!(ack(&mut tracker, &t[2]), Settled::Commit(13));
        assert_eq!(tracker.out(), 0);
    }

    #[test]
    fn out_of_order_acks_never_commit_past_an_unacked_offset() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[0, 1, 2, 3, 4]);
        // 0 is still out: acking 4, 2, 3, 1 commits nothing.
        for i in [4, 2, 3, 1] {
            assert_eq!(ack(&mut tracker, &t[i]), Settled::Nothing, "ack {i}");
        }
        // 0 acked: everything up to 4 is done.
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Commit(5));
    }

    #[test]
    fn the_position_moves_to_the_lowest_offset_still_out() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[0, 1, 2, 3]);
        assert_eq!(ack(&mut tracker, &t[1]), Settled::Nothing);
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Commit(2));
        assert_eq!(ack(&mut tracker, &t[3]), Settled::Nothing);
        assert_eq!(ack(&mut tracker, &t[2]), Settled::Commit(4));
    }

    #[test]
    fn gaps_in_the_log_do_not_hold_the_position_back() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        // Offsets 1-2 and 4-6 do not exist (compacted, or transaction markers).
        let t = take(&mut tracker, &[0, 3, 7]);
        assert_eq!(ack(&mut tracker, &t[1]), Settled::Nothing);
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Commit(7));
        assert_eq!(ack(&mut tracker, &t[2]), Settled::Commit(8));
    }

    #[test]
    fn a_handed_back_delivery_holds_its_partition_but_not_others() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        tracker.assigned("t", 1);
        let (handed_back, _) = tracker.received("t", 0, 5).expect("assigned");
        let (after, _) = tracker.received("t", 0, 6).expect("assigned");
        let (other, _) = tracker.received("t", 1, 9).expect("assigned");
        // `handed_back` is never acknowledged (requeue or dropped).
        assert_eq!(ack(&mut tracker, &after), Settled::Nothing);
        assert_eq!(ack(&mut tracker, &other), Settled::Commit(10));
        assert_eq!(tracker.next_commit(&handed_back), Settled::Nothing);
        assert_eq!(tracker.out(), 1);
    }

    #[test]
    fn settlements_of_a_revoked_partition_are_refused_even_after_reassignment() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[0, 1]);
        tracker.revoked("t", 0);
        assert!(!tracker.is_assigned("t", 0));
        assert_eq!(tracker.received("t", 0, 2), None);
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Revoked);
        // Assigned again: a new epoch starts from what the group committed.
        tracker.assigned("t", 0);
        assert_eq!(ack(&mut tracker, &t[1]), Settled::Revoked);
        let (again, redelivered) = tracker.received("t", 0, 0).expect("assigned");
        assert!(redelivered, "offset 0 was received before");
        assert_eq!(ack(&mut tracker, &again), Settled::Commit(1));
        let (_, redelivered) = tracker.received("t", 0, 2).expect("assigned");
        assert!(!redelivered);
    }

    #[test]
    fn a_failed_commit_is_retried_by_the_next_settlement() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[0, 1]);
        assert_eq!(ack(&mut tracker, &t[0]), Settled::Commit(1));
        tracker.commit_failed(&t[0], 1);
        assert_eq!(ack(&mut tracker, &t[1]), Settled::Commit(2));
    }

    #[test]
    fn a_position_already_committed_is_not_committed_again() {
        let mut tracker = OffsetTracker::default();
        tracker.assigned("t", 0);
        let t = take(&mut tracker, &[0, 1]);
        assert_eq!(tracker.acked(&t[0]), Settled::Nothing);
        assert_eq!(tracker.acked(&t[1]), Settled::Nothing);
        // Two settlements race to commit: the first commits 2, the second
        // finds nothing new.
        assert_eq!(tracker.next_commit(&t[1]), Settled::Commit(2));
        assert_eq!(tracker.next_commit(&t[0]), Settled::Nothing);
    }
}
