//! Byte sizes as people write them: `512`, `64K`, `1.5G`, `2TiB`.

/// Parses a size with an optional K/M/G/T suffix (powers of 1024; `KB`, `KiB` and `k`
/// mean the same). Fractions are allowed with a suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!("'{text}' is not a size: use a number with an optional K, M, G or T suffix"));
        }
    };
    let bad = || format!("'{text}' is not a size: use a number with an optional K, M, G or T suffix");
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(1 << shift).ok_or_else(|| format!("'{text}' is too large"));
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = value * f64::from(1u32 << (shift / 2)) * f64::from(1u32 << (shift - shift / 2));
    if shift == 0 || bytes.fract() != 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is not a whole number of bytes"));
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(bytes as u64)
}

/// Formats bytes for people: the largest binary unit that keeps one decimal.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("8mb"), Ok(8 << 20));
        for bad in ["", "G", "12X", "-1", "1.2.3M", "0.3", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
