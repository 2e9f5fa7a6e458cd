//! The simulated payment provider. The order saga's timer hook asks it for
//! a draw when the payment timer fires; the draw and the decision go into
//! the journal (as the `PaymentDecided` input).

use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// One payment decision: the random value drawn in `[0, 1)` and the verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaymentDraw {
    /// The random value in `[0, 1)`.
    pub value: f64,
    /// Whether the payment went through (`value < success_rate`).
    pub approved: bool,
}

/// Decides simulated payments: random in production, fixed in tests.
pub trait PaymentSimulator: Send + Sync + 'static {
    /// One payment decision.
    fn draw(&self) -> PaymentDraw;
}

/// Approves with probability `success_rate`, from a seeded or OS-seeded RNG.
pub struct RandomPayment {
    success_rate: f64,
    rng: Mutex<StdRng>,
}

impl RandomPayment {
    /// `success_rate` is clamped to `[0, 1]`; `seed` makes the sequence repeatable.
    pub fn new(success_rate: f64, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Self {
            success_rate: success_rate.clamp(0.0, 1.0),
            rng: Mutex::new(rng),
        }
    }
}

impl PaymentSimulator for RandomPayment {
    fn draw(&self) -> PaymentDraw {
        let value: f64 = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .random();
        PaymentDraw {
            value,
            approved: value < self.success_rate,
        }
    }
}

/// Always gives the same verdict (tests, demos).
#[derive(Clone, Copy, Debug)]
pub struct FixedPayment {
    /// The decision every draw returns.
    pub approved: bool,
}

impl PaymentSimulator for FixedPayment {
    fn draw(&self) -> PaymentDraw {
        PaymentDraw {
            value: if self.approved { 0.0 } else { 1.0 },
            approved: self.approved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        let a = RandomPayment::new(0.5, Some(7));
        let b = RandomPayment::new(0.5, Some(7));
        let da: Vec<_> = (0..50).map(|_| a.draw()).collect();
        let db: Vec<_> = (0..50).map(|_| b.draw()).collect();
        assert_eq!(da, db);
    }

    #[test]
    fn success_rate_bounds_are_exact() {
        let never = RandomPayment::new(0.0, Some(1));
        let always = RandomPayment::new(1.0, Some(1));
        assert!((0..1000).all(|_| !never.draw().approved));
        assert!((0..1000).all(|_| always.draw().approved));
    }

    #[test]
    fn half_rate_approves_about_half() {
        let sim = RandomPayment::new(0.5, Some(42));
        let approved = (0..10_000).filter(|_| sim.draw().approved).count();
        assert!((4_500..5_500).contains(&approved), "approved {approved}");
    }
}
