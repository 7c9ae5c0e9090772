//! Kubernetes quantities (`16Gi`, `500M`, `1e9`, `1500m`), read as the API
//! server's `resource.ParseQuantity` reads them: an optional sign, digits
//! with at most one `.`, then a suffix: a decimal SI one (`n u m k M G T P
//! E`), a binary one (`Ki Mi Gi Ti Pi Ei`) or a decimal exponent (`e3`,
//! `E-2`, `e+6`). `copyhold validate`, sizing and the controller share it,
//! so a value is refused here exactly when the API server would refuse it
//! in a Pod's resources; only the byte count asks more (not negative,
//! within u64).

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "\"{0}\": not a quantity: a number with an optional suffix, e.g. 16Gi, 500M, 1e9 or 1500m"
    )]
    Format(String),
    #[error(
        "\"{0}\": unknown suffix `{1}` (use n, u, m, k, M, G, T, P, E, Ki … Ei or e<exponent>)"
    )]
    Suffix(String, String),
    #[error("\"{0}\": must not be negative")]
    Negative(String),
    #[error("\"{0}\": too large")]
    TooLarge(String),
}

/// A parsed quantity: `±digits × 10^decimal_exp × 2^binary_exp`, exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    negative: bool,
    /// The significant digits, integer and fraction run together, without
    /// leading zeros (`"0"` for zero).
    digits: String,
    /// Power of ten: the suffix's, less the fraction's digits.
    decimal_exp: i64,
    /// Power of two of a binary suffix (`Ki` = 10 … `Ei` = 60).
    binary_exp: u32,
}

/// The number and the suffix, split as `parseQuantityString` splits them.
struct Parts<'a> {
    negative: bool,
    whole: &'a str,
    fraction: &'a str,
    suffix: &'a str,
}

impl Quantity {
    /// Parse `text` (surrounding white space is ignored, as the API server
    /// ignores it).
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let s = text.trim();
        let format = || QuantityError::Format(text.to_string());
        if s.is_empty() {
            return Err(format());
        }
        let p = split(s).ok_or_else(format)?;
        let (decimal, binary) = suffix_exponents(p.suffix)
            .ok_or_else(|| QuantityError::Suffix(text.to_string(), p.suffix.to_string()))?;
        if p.whole.is_empty() && p.fraction.is_empty() && !digitless_accepted(decimal, binary) {
            return Err(format());
        }
        let digits = format!("{}{}", p.whole, p.fraction);
        let digits = digits.trim_start_matches('0');
        let fraction_len = i64::try_from(p.fraction.len()).map_err(|_| format())?;
        Ok(Self {
            negative: p.negative && !digits.is_empty(),
            digits: if digits.is_empty() {
                "0".into()
            } else {
                digits.into()
            },
            decimal_exp: decimal - fraction_len,
            binary_exp: binary,
        })
    }

    /// The quantity as a whole number of bytes, rounded up as the API
    /// server's `Value()` rounds (`1500m` is 2). Exact for any length of
    /// digits: the arithmetic runs on the decimal digits.
    pub fn bytes(&self, text: &str) -> Result<u64, QuantityError> {
        let too_large = || QuantityError::TooLarge(text.to_string());
        if self.negative {
            return Err(QuantityError::Negative(text.to_string()));
        }
        let mut digits = times_power_of_two(&self.digits, self.binary_exp);
        let round_up = if self.decimal_exp >= 0 {
            // More than 20 digits is beyond u64 whatever they are.
            let zeros = usize::try_from(self.decimal_exp).map_err(|_| too_large())?;
            if digits.len().saturating_add(zeros) > 20 {
                return Err(too_large());
            }
            digits.extend(std::iter::repeat_n(0, zeros));
            false
        } else {
            let places = usize::try_from(self.decimal_exp.unsigned_abs()).unwrap_or(usize::MAX);
            let whole = digits.len().saturating_sub(places);
            let up = digits[whole..].iter().any(|d| *d != 0);
            digits.truncate(whole);
            up
        };
        let whole = digits.iter().try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(*d))
        });
        whole
            .and_then(|w| w.checked_add(u64::from(round_up)))
            .ok_or_else(too_large)
    }
}

impl Quantity {
    /// Whether two quantities stand for the same number, whatever their
    /// spelling: `0.5` and `500m`, `1Gi` and `1073741824`, `1e3` and `1k`.
    /// The API server writes quantities back in its canonical form, so a
    /// comparison of what was asked with what is stored must go by value.
    pub fn same_value(&self, other: &Self) -> bool {
        self.canonical() == other.canonical()
    }

    /// The value as `(negative, digits, power of ten)` with the power of two
    /// folded into the digits and no trailing zeros: one form per number.
    fn canonical(&self) -> (bool, Vec<u8>, i64) {
        let mut digits = times_power_of_two(&self.digits, self.binary_exp);
        if digits.iter().all(|d| *d == 0) {
            return (false, vec![0], 0);
        }
        let mut exp = self.decimal_exp;
        while digits.last() == Some(&0) {
            digits.pop();
            exp = exp.saturating_add(1);
        }
        (self.negative, digits, exp)
    }
}

/// `digits` (decimal, most significant first) times `2^exp`, `exp` ≤ 60.
fn times_power_of_two(digits: &str, exp: u32) -> Vec<u8> {
    let factor = 1u128 << exp;
    let mut out: Vec<u8> = Vec::with_capacity(digits.len() + 19);
    let mut carry = 0u128;
    for d in digits.bytes().rev() {
        let v = u128::from(d - b'0') * factor + carry;
        out.push((v % 10) as u8);
        carry = v / 10;
    }
    while carry > 0 {
        out.push((carry % 10) as u8);
        carry /= 10;
    }
    while out.len() > 1 && out.last() == Some(&0) {
        out.pop();
    }
    out.reverse();
    out
}

/// Bytes of a quantity such as `16Gi`, `500M` or `1e9`.
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    Quantity::parse(text)?.bytes(text)
}

/// Split as the API server does: sign, digits, `.` and digits, then the
/// suffix: letters of `eEinumkKMGTP`, an optional sign, digits. `None`:
/// the shape is wrong (anything after those).
fn split(s: &str) -> Option<Parts<'_>> {
    let (negative, rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let digits_end = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (whole, rest) = rest.split_at(digits_end(rest));
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(r) => r.split_at(digits_end(r)),
        None => ("", rest),
    };
    let letters = rest
        .find(|c: char| !"eEinumkKMGTP".contains(c))
        .unwrap_or(rest.len());
    let after_letters = &rest[letters..];
    let signed = after_letters
        .strip_prefix(['+', '-'])
        .unwrap_or(after_letters);
    if !signed.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Parts {
        negative,
        whole,
        fraction,
        suffix: rest,
    })
}

/// The powers of ten and of two a suffix stands for.
fn suffix_exponents(suffix: &str) -> Option<(i64, u32)> {
    let decimal = match suffix {
        "n" => Some(-9),
        "u" => Some(-6),
        "m" => Some(-3),
        "" => Some(0),
        "k" => Some(3),
        "M" => Some(6),
        "G" => Some(9),
        "T" => Some(12),
        "P" => Some(15),
        "E" => Some(18),
        _ => None,
    };
    if let Some(d) = decimal {
        return Some((d, 0));
    }
    let binary = match suffix {
        "Ki" => Some(10),
        "Mi" => Some(20),
        "Gi" => Some(30),
        "Ti" => Some(40),
        "Pi" => Some(50),
        "Ei" => Some(60),
        _ => None,
    };
    if let Some(b) = binary {
        return Some((0, b));
    }
    let exp = suffix.strip_prefix(['e', 'E'])?;
    // Go's strconv.ParseInt: an optional sign, then digits.
    let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The API server reads the exponent as 64 bits and keeps 32 of them.
    exp.parse::<i64>().ok().map(|e| (i64::from(e as i32), 0))
}

/// Whether the API server accepts a number with no digits at all (`Ki`,
/// `-`, `.`, `e3`: zero). It does where its fast path runs (the number is
/// then read as `0`) and not where it hands the empty text to its decimal
/// parser: a decimal exponent below -9, or `Pi` and `Ei` (whose precision
/// estimate is negative).
fn digitless_accepted(decimal_exp: i64, binary_exp: u32) -> bool {
    if binary_exp > 0 {
        binary_exp < 50
    } else {
        decimal_exp >= -9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared table (see its header): every row through this parser.
    const TABLE: &str = include_str!("../../../tests/formats/quantities.txt");

    /// `(value, api accepts, bytes column)` of each row.
    fn rows() -> Vec<(&'static str, bool, &'static str)> {
        TABLE
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 3, "three columns: {l}");
                (f[0], f[1] == "ok", f[2])
            })
            .collect()
    }

    #[test]
    fn the_parser_accepts_exactly_what_the_api_server_accepts_in_the_shared_table() {
        let rows = rows();
        assert!(rows.len() >= 40, "the table has its rows");
        let wrong: Vec<String> = rows
            .iter()
            .filter(|(v, ok, _)| Quantity::parse(v).is_ok() != *ok)
            .map(|(v, ok, _)| format!("{v}: api {ok}, parser {:?}", Quantity::parse(v)))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn bytes_follow_the_shared_table() {
        let wrong: Vec<String> = rows()
            .iter()
            .filter(|(_, ok, _)| *ok)
            .filter_map(|(v, _, want)| {
                let got = match bytes(v) {
                    Ok(b) => b.to_string(),
                    Err(QuantityError::Negative(_)) => "negative".into(),
                    Err(QuantityError::TooLarge(_)) => "too-large".into(),
                    Err(e) => e.to_string(),
                };
                (got != *want).then(|| format!("{v}: want {want}, got {got}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn quantities_spelled_differently_but_equal_in_value_are_the_same_value() {
        let same = |a: &str, b: &str| {
            Quantity::parse(a)
                .expect(a)
                .same_value(&Quantity::parse(b).expect(b))
        };
        assert!(same("0.5", "500m"));
        assert!(same("1Gi", "1073741824"));
        assert!(same("1.5Gi", "1536Mi"));
        assert!(same("1e3", "1k"));
        assert!(same("1000m", "1"));
        assert!(same("0", "-0.0Ki"));
        assert!(same("100.00", "100"));
        assert!(!same("0.5", "501m"));
        assert!(!same("1Gi", "1G"));
        assert!(!same("-1", "1"));
        assert!(!same("1", "10"));
    }

    #[test]
    fn white_space_around_a_quantity_is_ignored_as_the_api_server_ignores_it() {
        assert_eq!(bytes(" 16Gi\t"), Ok(16 << 30));
        assert!(Quantity::parse("1 Gi").is_err());
        assert!(Quantity::parse("").is_err());
        assert!(Quantity::parse("  ").is_err());
    }

    #[test]
    fn refusals_name_the_value_and_what_is_wrong() {
        let e = bytes("1k3").expect_err("no such suffix").to_string();
        assert!(e.contains("\"1k3\"") && e.contains("`k3`"), "{e}");
        let e = bytes("3Zi").expect_err("not a quantity").to_string();
        assert!(e.contains("\"3Zi\"") && e.contains("not a quantity"), "{e}");
        let e = bytes("-1Ki").expect_err("negative").to_string();
        assert!(e.contains("must not be negative"), "{e}");
    }
}
