//! Rate limiting for log lines that a guest or a network peer can trigger at will: a
//! flood of bad frames must not turn into a flood of log lines.

use std::time::{Duration, Instant};

/// Lets through at most `burst` messages per `window`; the rest are counted and the count
/// is reported with the next message that gets through.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    sent_in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(window: Duration, burst: u32) -> Self {
        LogLimiter { window, burst, window_start: None, sent_in_window: 0, suppressed: 0 }
    }

    /// Ten messages every five seconds: enough to see a problem, too few to flood a log.
    pub const fn default_rate() -> Self {
        Self::new(Duration::from_secs(5), 10)
    }

    /// Returns `Some(suppressed_since_last)` when a message may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        let window_over = match self.window_start {
            Some(start) => now.duration_since(start) >= self.window,
            None => true,
        };
        if window_over {
            self.window_start = Some(now);
            self.sent_in_window = 0;
        }
        if self.sent_in_window < self.burst {
            self.sent_in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// `log::warn!` through a `LogLimiter`, appending how many messages were held back.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            if suppressed > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_suppresses_and_reports_count() {
        let mut limiter = LogLimiter::new(Duration::from_millis(50), 2);
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limiter.allow(), Some(2));
        assert_eq!(limiter.allow(), Some(0));
    }
}
