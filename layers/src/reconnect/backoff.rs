use std::time::Duration;

/// Exponential backoff with jitter, for the [reconnect layer](super).
///
/// The delay before attempt `n` (counting from 1 after a failure) is
/// `initial * multiplier^(n-1)`, capped at `max`, then spread by ±`jitter` (never past `max`:
/// at the cap, downward only) so that many clients of one restarted server do not come back in
/// lockstep. A connection that stayed up
/// for `stable_after` resets the count, and its loss is answered by an attempt at once (a
/// dropped connection to a live server is mended without a wait); if that attempt fails too,
/// attempt 1 waits `initial`, spread by the jitter, and so on.
///
/// ```
/// use alkdev_pubsub_layers::reconnect::Backoff;
/// use std::time::Duration;
///
/// let backoff = Backoff::new()
///     .initial(Duration::from_millis(50))
///     .max(Duration::from_secs(5))
///     .multiplier(2.0)
///     .jitter(0.0)
///     .max_attempts(Some(10));
/// assert_eq!(backoff.delay(1), Duration::from_millis(50));
/// assert_eq!(backoff.delay(3), Duration::from_millis(200));
/// assert_eq!(backoff.delay(30), Duration::from_secs(5));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    max_attempts: Option<u32>,
    stable_after: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 10 s, ±20 % jitter, unlimited attempts, reset after 5 s up.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: None,
            stable_after: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The delay before the first retry.
    #[must_use]
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The longest delay.
    #[must_use]
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// How much each failed attempt multiplies the delay (at least 1).
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// The spread of each delay, as a fraction of it (0 to 1).
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter.clamp(0.0, 1.0);
        self
    }

    /// After this many failed attempts in a row, give up (`None`: never). An attempt that
    /// connected counts as failed when the connection did not stay up for
    /// [`stable_after`](Self::stable_after): a server that accepts and drops every connection
    /// is given up on as one that refuses them.
    #[must_use]
    pub fn max_attempts(mut self, max_attempts: Option<u32>) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// How long a connection must stay up for the attempt count to start over.
    #[must_use]
    pub fn stable_after(mut self, stable_after: Duration) -> Self {
        self.stable_after = stable_after;
        self
    }

    /// The attempt cap.
    pub fn get_max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// How long a connection must stay up to reset the count.
    pub fn get_stable_after(&self) -> Duration {
        self.stable_after
    }

    /// The delay before attempt `attempt` (from 1), with jitter: uniform over the jitter's
    /// range around the exponential delay capped at `max`, the part of that range above `max`
    /// cut off (so that clients at the cap do not all wait exactly `max`, and come back in
    /// lockstep).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let max = self.max.as_secs_f64();
        let capped = (self.initial.as_secs_f64() * self.multiplier.powi(exponent)).min(max);
        let high = (capped * (1.0 + self.jitter)).min(max);
        let low = capped * (1.0 - self.jitter);
        let delay = low + (high - low) * fastrand::f64();
        Duration::try_from_secs_f64(delay.max(0.0)).unwrap_or(self.max)
    }
}
