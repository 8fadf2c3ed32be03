//! Sizes as users write them (`8G`, `512K`, `auto` for a cache limit), the on-full policy as
//! they write it (`wait=30`), and sizes as we print them (`1.5 GiB`).

use crate::cow::{OnFull, SizeLimit};
use std::time::Duration;

/// Parses sizes like `4096`, `512K`, `8G`, `1TiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (try 8G, 512M, 4096)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("'{s}' is zero or too large"))
}

/// `--cache-size` and `cache resize`: a size, or `auto`.
pub fn parse_cache_size(s: &str) -> Result<SizeLimit, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(SizeLimit::Auto);
    }
    parse_size(s).map(SizeLimit::Fixed)
}

/// `--on-full`: `error`, `wait` (60 s) or `wait=SECS`.
pub fn parse_on_full(s: &str) -> Result<OnFull, String> {
    let bad = || format!("'{s}': the policy is `error`, `wait` or `wait=SECS`");
    match s.split_once('=') {
        None if s == "error" => Ok(OnFull::Error),
        None if s == "wait" => Ok(OnFull::DAEMON_DEFAULT),
        Some(("wait", secs)) => {
            let secs: f64 = secs.parse().map_err(|_| bad())?;
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .map(OnFull::Wait)
                .ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

/// A byte count in binary units, one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cache_limits_and_policies() {
        assert_eq!(parse_cache_size("auto"), Ok(SizeLimit::Auto));
        assert_eq!(parse_cache_size("2G"), Ok(SizeLimit::Fixed(2 << 30)));
        assert!(parse_cache_size("lots").is_err());
        assert_eq!(parse_on_full("error"), Ok(OnFull::Error));
        assert_eq!(
            parse_on_full("wait"),
            Ok(OnFull::Wait(Duration::from_secs(60)))
        );
        assert_eq!(
            parse_on_full("wait=2.5"),
            Ok(OnFull::Wait(Duration::from_millis(2500)))
        );
        for bad in ["wait=", "wait=-1", "wait=0", "sleep", "error=3"] {
            assert!(parse_on_full(bad).is_err(), "{bad}");
        }
        assert_eq!(OnFull::Wait(Duration::from_secs(60)).to_string(), "wait=60");
    }
}
