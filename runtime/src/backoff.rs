//! Retry delays: exponential (doubling) with a cap and optional jitter.
use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

type Delays = <ExponentialBuilder as BackoffBuilder>::Backoff;

/// Delays between retries: `min`, doubling each time up to `max`, each one
/// optionally spread by a random ±fraction (jitter) so that many clients
/// cut off together do not come back in step.
///
/// The doubling comes from `backon`; the jitter is symmetric (backon's only
/// adds), so the mean delay stays on the doubling curve.
#[derive(Debug)]
pub struct Backoff {
    policy: ExponentialBuilder,
    delays: Delays,
    max: Duration,
    jitter: f64,
    rng: fastrand::Rng,
}

impl Backoff {
    /// `min`, then doubling up to `max`, forever; no jitter.
    pub fn exponential(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        let policy = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            policy,
            delays: policy.build(),
            max,
            jitter: 0.0,
            rng: fastrand::Rng::new(),
        }
    }

    /// Spreads every delay uniformly over ±`fraction` of it (clamped to
    /// 0..=1; 0.25 gives 0.75..1.25 times the delay).
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// Seeds the jitter, for reproducible sequences in tests.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Without a limit on attempts the sequence never ends; the fallback
        // only guards against that changing.
        let base = self.delays.next().unwrap_or(self.max);
        if self.jitter == 0.0 {
            return base;
        }
        base.mul_f64(1.0 + self.jitter * (2.0 * self.rng.f64() - 1.0))
    }

    /// Starts again from the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.policy.build();
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// Equal to within a microsecond (backon doubles in f32).
    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::exponential(100 * MS, Duration::from_secs(5));
        let want = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (i, w) in want.iter().enumerate() {
            let d = b.next_delay();
            assert!(close(d, *w * MS), "delay {i}: {d:?}, want {w} ms");
        }
    }

    #[test]
    fn reclaim_timings() {
        let mut b = Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30));
        let got: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::exponential(100 * MS, Duration::from_secs(5));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(close(b.next_delay(), 100 * MS));
        assert!(close(b.next_delay(), 200 * MS));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        for seed in 0..50 {
            let mut b = Backoff::exponential(100 * MS, Duration::from_secs(5))
                .with_jitter(0.25)
                .with_seed(seed);
            let mut base = 100.0_f64;
            for _ in 0..12 {
                let d = b.next_delay().as_secs_f64() * 1000.0;
                assert!(
                    (base * 0.75 - 0.001..base * 1.25).contains(&d),
                    "seed {seed}: {d} ms outside ±25% of {base} ms"
                );
                base = (base * 2.0).min(5000.0);
            }
        }
        let mut b = Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1))
            .with_jitter(0.25)
            .with_seed(7);
        let first = b.next_delay();
        assert!((0..20).any(|_| b.next_delay() != first), "jitter varies");
    }

    #[test]
    fn max_below_min_is_min() {
        let mut b = Backoff::exponential(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
