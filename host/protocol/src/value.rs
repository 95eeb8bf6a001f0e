//! Typed values from pgoutput's text format.
//!
//! pgoutput sends each column in the type's text output format (PostgreSQL docs,
//! "Logical Replication Message Formats", TupleData). [`decode`] turns a [`RawDatum`] into
//! a [`Value`] keyed by the column's type OID (`pg_type.oid`, from `pg_type.dat`). The
//! replication connection pins `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `TimeZone=UTC` and `extra_float_digits=3` (see the host's `source::replication`), so
//! dates and timestamps arrive in one known shape and floats round-trip exactly.
//!
//! Text borrows from the message; only `bytea` is decoded into a new buffer.
//! NULL, an unchanged TOAST value and an empty string are three different values.
//! Types not listed in [`Value`] pass through as [`Value::Other`] with their OID.

use std::borrow::Cow;
use std::fmt;

use crate::pgoutput::{Oid, RawDatum};

/// Well-known type OIDs (PostgreSQL's `src/include/catalog/pg_type.dat`).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// A decoded column value. Text variants borrow the replication message.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that PostgreSQL did not send: the stored value stays.
    UnchangedToast,
    /// `bool`.
    Bool(bool),
    /// `int2`, `int4`, `int8`, `oid`.
    Int(i64),
    /// `float4`, `float8` (including NaN and ±Infinity).
    Float(f64),
    /// `numeric`, exact, as PostgreSQL printed it (`NaN`, `Infinity` included).
    Numeric(&'a str),
    /// `text`, `varchar`, `bpchar`, `name`, `char`.
    Text(&'a str),
    /// `bytea`, decoded from its hex text form.
    Bytes(Cow<'a, [u8]>),
    /// `uuid`, 16 bytes.
    Uuid([u8; 16]),
    /// `date`: days since 1970-01-01; `i32::MIN`/`i32::MAX` for `-infinity`/`infinity`.
    Date(i32),
    /// `time`: microseconds since midnight.
    Time(i64),
    /// `timestamp` (no time zone): microseconds since 1970-01-01 00:00:00;
    /// `i64::MIN`/`i64::MAX` for `-infinity`/`infinity`. The few timestamps PostgreSQL
    /// has past 294247 AD do not fit and arrive as [`Value::Other`] with their text.
    Timestamp(i64),
    /// `timestamptz`: microseconds since the Unix epoch, UTC; infinities as above.
    TimestampTz(i64),
    /// `json` or `jsonb`, the document's text.
    Json(&'a str),
    /// Any array type, in PostgreSQL's array text form (`{1,2,3}`), with the array's OID.
    Array {
        /// The array type's OID.
        type_oid: Oid,
        /// The array literal.
        text: &'a str,
    },
    /// Any other type in text form (intervals, enums, geometric types, domains, ...).
    Other {
        /// The type's OID.
        type_oid: Oid,
        /// The value's text form.
        text: &'a str,
    },
    /// A value in binary format (only with `binary 'true'`, which dbmazz does not ask
    /// for), passed through.
    Binary {
        /// The type's OID.
        type_oid: Oid,
        /// The raw bytes.
        bytes: &'a [u8],
    },
}

/// A text value that does not parse as its declared type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("value {text:?} is not a valid {type_name} (type oid {type_oid})")]
pub struct ValueError {
    /// The column type's OID.
    pub type_oid: Oid,
    /// The type's name.
    pub type_name: &'static str,
    /// The text received (cut to 64 bytes).
    pub text: String,
}

/// Array type OIDs of the built-in types (`typarray` in `pg_type.dat`).
fn is_builtin_array(type_oid: Oid) -> bool {
    matches!(
        type_oid,
        1000 | 1001
            | 1002
            | 1003
            | 1005
            | 1007
            | 1009
            | 1014
            | 1015
            | 1016
            | 1021
            | 1022
            | 1028
            | 1115
            | 1182
            | 1183
            | 1185
            | 1187
            | 1231
            | 1270
            | 2951
            | 199
            | 3807
            | 143
    )
}

/// Decodes a raw column value by its type OID.
///
/// # Errors
/// [`ValueError`] when the text does not parse as the type (which PostgreSQL never
/// sends, so it means a corrupted stream or a wrong OID).
pub fn decode<'a>(type_oid: Oid, raw: RawDatum<'a>) -> Result<Value<'a>, ValueError> {
    let text = match raw {
        RawDatum::Null => return Ok(Value::Null),
        RawDatum::UnchangedToast => return Ok(Value::UnchangedToast),
        RawDatum::Binary(bytes) => return Ok(Value::Binary { type_oid, bytes }),
        RawDatum::Text(t) => t,
    };
    let bad = |type_name: &'static str| ValueError {
        type_oid,
        type_name,
        text: text.chars().take(64).collect(),
    };
    Ok(match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(bad("bool")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            Value::Int(text.parse().map_err(|_| bad("integer"))?)
        }
        oid::FLOAT4 | oid::FLOAT8 => Value::Float(parse_float(text).ok_or_else(|| bad("float"))?),
        oid::NUMERIC => {
            if !is_numeric_text(text) {
                return Err(bad("numeric"));
            }
            Value::Numeric(text)
        }
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => Value::Text(text),
        oid::BYTEA => Value::Bytes(Cow::Owned(decode_bytea(text).ok_or_else(|| bad("bytea"))?)),
        oid::UUID => Value::Uuid(parse_uuid(text).ok_or_else(|| bad("uuid"))?),
        oid::DATE => Value::Date(parse_date(text).ok_or_else(|| bad("date"))?),
        oid::TIME => Value::Time(parse_time(text).ok_or_else(|| bad("time"))?),
        // PostgreSQL's timestamps reach 294276 AD; microseconds since 1970 in an i64 end
        // in 294247 AD. A valid timestamp past that stays text (nothing is lost).
        oid::TIMESTAMP => match parse_timestamp(text, false).ok_or_else(|| bad("timestamp"))? {
            Micros::Fits(us) => Value::Timestamp(us),
            Micros::OutOfRange => Value::Other { type_oid, text },
        },
        oid::TIMESTAMPTZ => match parse_timestamp(text, true).ok_or_else(|| bad("timestamptz"))? {
            Micros::Fits(us) => Value::TimestampTz(us),
            Micros::OutOfRange => Value::Other { type_oid, text },
        },
        oid::JSON | oid::JSONB => Value::Json(text),
        t if is_builtin_array(t) => Value::Array { type_oid, text },
        _ => Value::Other { type_oid, text },
    })
}

fn parse_float(t: &str) -> Option<f64> {
    match t {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

fn is_numeric_text(t: &str) -> bool {
    if matches!(t, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let b = t.as_bytes();
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    !digits.is_empty()
        && digits.iter().filter(|&&c| c == b'.').count() <= 1
        && digits.iter().all(|&c| c.is_ascii_digit() || c == b'.')
        && digits.iter().any(u8::is_ascii_digit)
}

/// `\x` followed by hex digits (PostgreSQL's default `bytea_output = hex`).
fn decode_bytea(t: &str) -> Option<Vec<u8>> {
    let hex = t.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push((hex_val(pair[0])? << 4) | hex_val(pair[1])?);
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn parse_uuid(t: &str) -> Option<[u8; 16]> {
    let b = t.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    // 8-4-4-4-12 hex digits: each byte's two digits start at a fixed offset
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [0u8; 16];
    for (o, &i) in out.iter_mut().zip(&AT) {
        *o = (hex_val(b[i])? << 4) | hex_val(b[i + 1])?;
    }
    Some(out)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 18 {
        return None;
    }
    let mut v = 0i64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
    }
    Some(v)
}

/// Days from 1970-01-01 to the proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian (year, month, day) of a day count from 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYY-MM-DD[ BC]` → days since 1970-01-01.
fn parse_date(t: &str) -> Option<i32> {
    match t {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(s) => (s, true),
        None => (t, false),
    };
    let days = parse_ymd(t.as_bytes(), bc)?;
    i32::try_from(days).ok()
}

fn parse_ymd(b: &[u8], bc: bool) -> Option<i64> {
    // the year may have more than 4 digits
    let dash = b.iter().position(|&c| c == b'-')?;
    // PostgreSQL's years end at 5874897 (dates); more digits are not a date it sends,
    // and would overflow the day arithmetic
    if dash > 7 || b.len() != dash + 6 || b[dash + 3] != b'-' {
        return None;
    }
    let mut y = digits(&b[..dash])?;
    let m = digits(&b[dash + 1..dash + 3])?;
    let d = digits(&b[dash + 4..dash + 6])?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    if bc {
        y = 1 - y; // 1 BC is year 0
    }
    Some(days_from_civil(y, m, d))
}

/// `HH:MM:SS[.ffffff]` → microseconds.
fn parse_time(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let h = digits(&b[0..2])?;
    let m = digits(&b[3..5])?;
    let s = digits(&b[6..8])?;
    let mut us = 0;
    if b.len() > 8 {
        if b[8] != b'.' || b.len() > 15 || b.len() == 9 {
            return None;
        }
        let frac = &b[9..];
        us = digits(frac)? * 10i64.pow(6 - frac.len() as u32);
    }
    // PostgreSQL prints 00:00:00 through 24:00:00 (a leap second never: 23:59:60 is
    // read as 24:00:00)
    let total = ((h * 60 + m) * 60 + s) * 1_000_000 + us;
    if m > 59 || s > 59 || total > 86_400_000_000 {
        return None;
    }
    Some(total)
}

/// A well-formed timestamp's microseconds since the epoch, or the news that they do not
/// fit an `i64` (other than as the infinity sentinels `i64::MIN`/`i64::MAX`).
enum Micros {
    Fits(i64),
    OutOfRange,
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]` → microseconds since the epoch;
/// `None` when the text is not of that shape.
fn parse_timestamp(t: &str, with_zone: bool) -> Option<Micros> {
    match t {
        "infinity" => return Some(Micros::Fits(i64::MAX)),
        "-infinity" => return Some(Micros::Fits(i64::MIN)),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(s) => (s, true),
        None => (t, false),
    };
    let (date, rest) = t.split_once(' ')?;
    let days = parse_ymd(date.as_bytes(), bc)?;
    let (time, offset_s) = if with_zone {
        let at = rest.rfind(['+', '-'])?;
        (&rest[..at], parse_offset(&rest[at..])?)
    } else {
        (rest, 0)
    };
    let us = parse_time(time)?;
    // years have at most 7 digits and offsets 2-digit parts: no i128 overflow
    let total =
        i128::from(days) * 86_400_000_000 + i128::from(us) - i128::from(offset_s) * 1_000_000;
    Some(match i64::try_from(total) {
        Ok(v) if v != i64::MAX && v != i64::MIN => Micros::Fits(v),
        _ => Micros::OutOfRange,
    })
}

fn parse_offset(t: &str) -> Option<i64> {
    let sign = match t.as_bytes().first()? {
        b'-' => -1,
        _ => 1,
    };
    // each part is two digits (PostgreSQL's offsets are within ±15:59:59)
    let part = |p: &str| (p.len() == 2).then(|| digits(p.as_bytes())).flatten();
    let mut parts = t.get(1..)?.split(':');
    let h = part(parts.next()?)?;
    let m = parts.next().map_or(Some(0), part)?;
    let s = parts.next().map_or(Some(0), part)?;
    Some(sign * (h * 3600 + m * 60 + s))
}

/// Formats microseconds since the epoch as `YYYY-MM-DD HH:MM:SS[.ffffff][ BC]` (UTC), the
/// form PostgreSQL prints a `timestamp` in with `DateStyle=ISO`.
pub struct TimestampDisplay(pub i64);

/// Formats microseconds since the epoch as a `timestamptz` under `TimeZone=UTC`:
/// `YYYY-MM-DD HH:MM:SS[.ffffff]+00[ BC]` (the zone before any ` BC`).
pub struct TimestampTzDisplay(pub i64);

impl fmt::Display for TimestampTzDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_timestamp(f, self.0, "+00")
    }
}

impl fmt::Display for TimestampDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_timestamp(f, self.0, "")
    }
}

fn write_timestamp(f: &mut fmt::Formatter<'_>, us: i64, zone: &str) -> fmt::Result {
    match us {
        i64::MAX => return f.write_str("infinity"),
        i64::MIN => return f.write_str("-infinity"),
        _ => {}
    }
    let days = us.div_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let (y, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    write!(
        f,
        "{y:04}-{m:02}-{d:02} {}{zone}{bc}",
        TimeDisplay(us.rem_euclid(86_400_000_000))
    )
}

/// Formats microseconds since midnight as `HH:MM:SS[.ffffff]`, as PostgreSQL prints a
/// `time` (`24:00:00` included).
pub struct TimeDisplay(pub i64);

impl fmt::Display for TimeDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let frac = self.0.rem_euclid(1_000_000);
        write!(
            f,
            "{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        if frac != 0 {
            let s = format!("{frac:06}");
            write!(f, ".{}", s.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

/// Formats a day count as `YYYY-MM-DD`.
pub struct DateDisplay(pub i32);

impl fmt::Display for DateDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            i32::MAX => return f.write_str("infinity"),
            i32::MIN => return f.write_str("-infinity"),
            _ => {}
        }
        let (y, m, d) = civil_from_days(self.0.into());
        if y <= 0 {
            write!(f, "{:04}-{m:02}-{d:02} BC", 1 - y)
        } else {
            write!(f, "{y:04}-{m:02}-{d:02}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(oid: Oid, s: &str) -> Value<'_> {
        decode(oid, RawDatum::Text(s)).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, .. Default::default() })]

        /// Any text, and any date-shaped text, decodes or errs for every type: no panic.
        #[test]
        fn arbitrary_text_never_panics(
            text in "\\PC{0,40}",
            shaped in "[0-9]{1,12}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,8})?([+-][0-9]{1,4}(:[0-9]{1,4}){0,2})?)?( BC)?",
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            for o in [oid::BOOL, oid::BYTEA, oid::INT2, oid::INT4, oid::INT8, oid::OID, oid::FLOAT4,
                      oid::FLOAT8, oid::NUMERIC, oid::DATE, oid::TIME, oid::TIMETZ, oid::TIMESTAMP,
                      oid::TIMESTAMPTZ, oid::INTERVAL, oid::UUID, oid::JSON, oid::JSONB, oid::TEXT] {
                let _ = decode(o, RawDatum::Text(&text));
                let _ = decode(o, RawDatum::Text(&shaped));
                let _ = decode(o, RawDatum::Binary(&bytes));
            }
        }
    }

    /// Values no PostgreSQL sends (found reading for overflows): an error, not a panic
    /// (debug builds check arithmetic) and not a wrapped-around value.
    #[test]
    fn hostile_dates_and_offsets_are_errors() {
        for (o, s) in [
            (oid::DATE, "999999999999999999-01-01"),
            (oid::TIMESTAMP, "99999999999999-01-01 00:00:00"),
            (oid::TIMESTAMPTZ, "2024-01-01 00:00:00+999999999999999999"),
            (oid::TIMESTAMPTZ, "2024-01-01 00:00:00+"),
            (oid::TIMESTAMPTZ, "2024-01-01 00:00:00-05:999999999999"),
        ] {
            assert!(decode(o, RawDatum::Text(s)).is_err(), "{s}");
        }
        // the largest year PostgreSQL has still parses
        assert!(decode(oid::DATE, RawDatum::Text("5874897-12-31")).is_ok());
        assert!(decode(
            oid::TIMESTAMPTZ,
            RawDatum::Text("2024-01-01 00:00:00-05:30")
        )
        .is_ok());
    }

    #[test]
    fn scalars() {
        assert_eq!(t(oid::BOOL, "t"), Value::Bool(true));
        assert_eq!(t(oid::INT8, "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(
            t(oid::FLOAT8, "0.30000000000000004"),
            Value::Float(0.30000000000000004)
        );
        assert!(matches!(t(oid::FLOAT4, "NaN"), Value::Float(f) if f.is_nan()));
        assert_eq!(
            t(oid::NUMERIC, "-12345678901234567890.000001"),
            Value::Numeric("-12345678901234567890.000001")
        );
        assert_eq!(t(oid::TEXT, ""), Value::Text(""));
        assert_eq!(
            t(oid::BYTEA, "\\x00ff10"),
            Value::Bytes(Cow::Owned(vec![0, 255, 16]))
        );
        assert_eq!(
            t(oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid([
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11
            ])
        );
        assert_eq!(t(oid::JSONB, "{\"a\": 1}"), Value::Json("{\"a\": 1}"));
        assert_eq!(
            t(1007, "{1,2}"),
            Value::Array {
                type_oid: 1007,
                text: "{1,2}"
            }
        );
        assert_eq!(
            t(1186, "1 day"),
            Value::Other {
                type_oid: 1186,
                text: "1 day"
            }
        );
    }

    #[test]
    fn null_unchanged_and_empty_are_distinct() {
        assert_eq!(decode(oid::TEXT, RawDatum::Null).unwrap(), Value::Null);
        assert_eq!(
            decode(oid::TEXT, RawDatum::UnchangedToast).unwrap(),
            Value::UnchangedToast
        );
        assert_eq!(
            decode(oid::TEXT, RawDatum::Text("")).unwrap(),
            Value::Text("")
        );
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(t(oid::DATE, "1970-01-02"), Value::Date(1));
        assert_eq!(t(oid::DATE, "infinity"), Value::Date(i32::MAX));
        assert_eq!(t(oid::TIME, "01:02:03.5"), Value::Time(3_723_500_000));
        assert_eq!(
            t(oid::TIMESTAMP, "2000-01-01 00:00:00"),
            Value::Timestamp(946_684_800_000_000)
        );
        assert_eq!(
            t(oid::TIMESTAMPTZ, "2000-01-01 01:00:00.25+01"),
            Value::TimestampTz(946_684_800_250_000)
        );
        assert_eq!(
            t(oid::TIMESTAMPTZ, "2000-01-01 00:00:00-05:30"),
            Value::TimestampTz(946_684_800_000_000 + 19_800_000_000)
        );
        assert_eq!(
            TimestampDisplay(946_684_800_250_000).to_string(),
            "2000-01-01 00:00:00.25"
        );
        assert_eq!(DateDisplay(0).to_string(), "1970-01-01");
        let Value::Date(d) = t(oid::DATE, "0044-03-15 BC") else {
            panic!()
        };
        assert_eq!(DateDisplay(d).to_string(), "0044-03-15 BC");
        for d in [-800_000i64, -1, 0, 59, 60, 365 * 400, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    /// Values the type battery (tests/types.rs) found printed differently from
    /// PostgreSQL: `24:00:00`, the zone of a BC timestamptz, PostgreSQL's last timestamps.
    #[test]
    fn edges_print_as_postgresql_prints_them() {
        let Value::Time(us) = t(oid::TIME, "24:00:00") else {
            panic!()
        };
        assert_eq!(TimeDisplay(us).to_string(), "24:00:00");
        assert_eq!(TimeDisplay(500_000).to_string(), "00:00:00.5");
        let text = "0044-03-15 12:00:00+00 BC";
        let Value::TimestampTz(us) = t(oid::TIMESTAMPTZ, text) else {
            panic!()
        };
        assert_eq!(TimestampTzDisplay(us).to_string(), text);
        assert_eq!(TimestampTzDisplay(0).to_string(), "1970-01-01 00:00:00+00");
        assert_eq!(TimestampTzDisplay(i64::MAX).to_string(), "infinity");
        // past i64 microseconds since 1970 (294247 AD) but valid in PostgreSQL: text
        for (o, text) in [
            (oid::TIMESTAMP, "294276-12-31 23:59:59.999999"),
            (oid::TIMESTAMPTZ, "294276-12-31 23:59:59.999999+00"),
        ] {
            assert_eq!(t(o, text), Value::Other { type_oid: o, text });
        }
        let Value::Timestamp(us) = t(oid::TIMESTAMP, "294246-12-31 23:59:59") else {
            panic!()
        };
        assert_eq!(TimestampDisplay(us).to_string(), "294246-12-31 23:59:59");
    }

    #[test]
    fn bad_text_is_an_error_not_a_panic() {
        for (o, s) in [
            // found by the `value` fuzz target: a fifth dash overran the 16 bytes
            (oid::UUID, "a0eec9b9-9c0b-4efb-4ef8-bb6d-6bb9bd3"),
            // and times past 24:00:00, which print back as something else
            (oid::TIME, "24:59:60.999999"),
            (oid::TIME, "24:00:00.000001"),
            (oid::BOOL, "yes"),
            (oid::INT4, "1.5"),
            (oid::NUMERIC, "1e5x"),
            (oid::BYTEA, "\\x0"),
            (oid::UUID, "nope"),
            (oid::DATE, "2020-13-01"),
            (oid::TIME, "1:2:3"),
            (oid::TIMESTAMPTZ, "2020-01-01"),
        ] {
            let e = decode(o, RawDatum::Text(s)).unwrap_err();
            assert_eq!(e.type_oid, o);
        }
    }
}
