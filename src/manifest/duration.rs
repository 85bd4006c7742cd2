//! Durations written the way Consul (and Go's `time.ParseDuration`) writes them: `500ms`, `10s`,
//! `1m30s`, `1.5h`. Parsing and formatting live together so that what we send to Consul reads the
//! same as what the operator wrote.

use std::fmt;
use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("negative durations are not allowed: {0:?}")]
    Negative(String),
    #[error("invalid duration {0:?}: expected a number and a unit, e.g. 500ms, 10s, 1m30s")]
    Invalid(String),
    #[error("unknown unit {unit:?} in duration {input:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} is too large: Go and Consul accept at most {max}", max = format(MAX))]
    Overflow(String),
}

/// The longest duration Go's `time.Duration` (and so Consul) can hold: 2^63 - 1 nanoseconds,
/// about 292 years. Every duration in a manifest is at most this, so that what we send to Consul
/// parses there and sums of two durations never overflow ours.
pub const MAX: Duration = Duration::new(9_223_372_036, 854_775_807);

/// Parses a Go-style duration. A bare `0` is accepted (as in Go); any other number needs a unit.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if let Some(rest) = s.strip_prefix('-') {
        if rest != "0" {
            return Err(DurationError::Negative(input.to_string()));
        }
        return Ok(Duration::ZERO);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || DurationError::Invalid(input.to_string());
    let mut total: u128 = 0; // nanoseconds
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if num_len == 0 {
            return Err(invalid());
        }
        let (number, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    unit: unit.to_string(),
                    input: input.to_string(),
                });
            }
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(invalid());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| DurationError::Overflow(input.to_string()))?
        };
        let mut part = whole
            .checked_mul(scale)
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        // Fractional digits beyond nanosecond precision are dropped, as Go does.
        let mut frac_scale = scale;
        for digit in frac.bytes() {
            frac_scale /= 10;
            if frac_scale == 0 {
                break;
            }
            part = part
                .checked_add(u128::from(digit - b'0') * frac_scale)
                .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        }
        total = total
            .checked_add(part)
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        rest = after;
    }
    if total > MAX.as_nanos() {
        return Err(DurationError::Overflow(input.to_string()));
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .map_err(|_| DurationError::Overflow(input.to_string()))?;
    // The remainder of a division by 1e9 always fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration in the same style, shortest exact form: `10s`, `1m30s`, `250ms`, `0s`.
pub fn format(d: Duration) -> String {
    Formatted(d).to_string()
}

struct Formatted(Duration);

impl fmt::Display for Formatted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d.subsec_nanos() != 0 && d.as_secs() == 0 {
            let nanos = d.subsec_nanos();
            return if nanos.is_multiple_of(1_000_000) {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let secs = d.as_secs();
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        let nanos = d.subsec_nanos();
        if nanos != 0 {
            let frac = format!("{nanos:09}");
            write!(f, "{s}.{}s", frac.trim_end_matches('0'))
        } else if s > 0 {
            write!(f, "{s}s")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_consul_style_durations() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2h45m"), Ok(Duration::from_secs(9900)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_what_go_refuses() {
        assert!(matches!(parse(""), Err(DurationError::Empty)));
        assert!(matches!(parse("10"), Err(DurationError::Invalid(_))));
        assert!(matches!(parse("s"), Err(DurationError::Invalid(_))));
        assert!(matches!(parse("-5s"), Err(DurationError::Negative(_))));
        assert!(matches!(
            parse("5 s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("5sec"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse("1..5s"), Err(DurationError::Invalid(_))));
        assert!(matches!(
            parse("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn caps_at_gos_largest_duration() {
        assert_eq!(parse("2562047h47m16.854775807s"), Ok(MAX));
        assert_eq!(format(MAX), "2562047h47m16.854775807s");
        for too_long in [
            "2562047h47m16.854775808s",
            "2562048h",
            "3000000000000000h",
            "9223372036854775808ns",
            // A whole part that fits u128 only just, plus a fraction: never wraps to a short one.
            "340282366920938463463374607431.9s",
            "94522879700260684295381835.9h",
        ] {
            assert!(
                matches!(parse(too_long), Err(DurationError::Overflow(_))),
                "{too_long}"
            );
        }
        // Two of the longest durations still add up without overflow.
        assert!(MAX.checked_add(MAX).is_some());
    }

    #[test]
    fn formats_round_trip() {
        for s in [
            "0s", "10s", "1m30s", "250ms", "1h", "2h45m", "1.5s", "100us", "7ns",
        ] {
            let d = parse(s).expect("valid");
            assert_eq!(format(d), s);
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
