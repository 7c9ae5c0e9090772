//! Durations as the CRDs spell them: one or more `<number><unit>` parts
//! (`90s`, `1h30m`, `1.5h`, `250ms`, `7d`), units `ms`, `s`, `m`, `h`, `d`.
//! [`DURATION_PATTERN`] is both the CRDs' schema pattern and what
//! [`parse_duration`] checks first, so `copyhold validate`, the controller
//! and the API server accept the same strings (`1w` and `2M`, which
//! humantime read, are refused by all three).

use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

/// Pattern for durations, in the CRDs' OpenAPI schema and in
/// [`parse_duration`].
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$";

static PATTERN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(DURATION_PATTERN).unwrap_or_else(|e| unreachable!("DURATION_PATTERN: {e}"))
});

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("\"{0}\": must be a duration such as 30s, 5m, 1.5h or 1h30m (units ms, s, m, h, d)")]
    Format(String),
    #[error("\"{0}\": longer than this controller can count")]
    TooLong(String),
}

/// Parse a duration of [`DURATION_PATTERN`]'s shape. Fractions are exact
/// to the nanosecond (digits below that are dropped).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    if !PATTERN.is_match(s) {
        return Err(DurationError::Format(s.to_string()));
    }
    let too_long = || DurationError::TooLong(s.to_string());
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let (nanos, tail) = part(rest).ok_or_else(too_long)?;
        total = total.checked_add(nanos).ok_or_else(too_long)?;
        rest = tail;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// One `<number><unit>` part at the start of `s` (which the pattern has
/// checked): its nanoseconds and what follows it. `None` only on
/// overflow.
fn part(s: &str) -> Option<(u128, &str)> {
    let unit_at = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, tail) = s.split_at(unit_at);
    let (unit, tail) = if let Some(t) = tail.strip_prefix("ms") {
        (1_000_000u128, t)
    } else {
        let n = match tail.as_bytes().first()? {
            b's' => 1_000_000_000,
            b'm' => 60 * 1_000_000_000,
            b'h' => 3_600 * 1_000_000_000,
            b'd' => 86_400 * 1_000_000_000,
            _ => return None,
        };
        (n, &tail[1..])
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u128 = whole.parse().ok()?;
    // 20 digits of fraction are far below a nanosecond of any unit, and
    // keep the product within u128.
    let fraction = &fraction[..fraction.len().min(20)];
    let frac_nanos = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().ok()? * unit / 10u128.pow(fraction.len() as u32)
    };
    Some((whole.checked_mul(unit)?.checked_add(frac_nanos)?, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared table (see its header): every row through this parser.
    const TABLE: &str = include_str!("../../../tests/formats/durations.txt");

    #[test]
    fn durations_follow_the_shared_table() {
        let mut rows = 0;
        let mut wrong = Vec::new();
        for line in TABLE.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rows += 1;
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 3, "three columns: {line}");
            let got = match parse_duration(f[0]) {
                Ok(d) => d.as_nanos().to_string(),
                Err(_) => "-".to_string(),
            };
            let ok = f[1] == "ok";
            if got != f[2] || (got != "-") != ok {
                wrong.push(format!("{}: want {} {}, got {got}", f[0], f[1], f[2]));
            }
        }
        assert!(rows >= 20, "the table has its rows");
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn the_pattern_is_the_crds_pattern() {
        let crd = include_str!("../../../crds/energybudgets.copyhold.dev.yaml");
        assert!(
            crd.contains(&format!("pattern: {DURATION_PATTERN}")),
            "{DURATION_PATTERN}"
        );
    }

    #[test]
    fn a_refusal_names_the_value_and_the_units() {
        let e = parse_duration("1w")
            .expect_err("weeks are not a unit")
            .to_string();
        assert!(e.contains("\"1w\"") && e.contains("ms, s, m, h, d"), "{e}");
    }
}
