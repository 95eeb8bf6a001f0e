//! PostgreSQL values as the JSON that StarRocks' Stream Load (`format: json`) reads.
//!
//! Values arrive in PostgreSQL's text form; the host pins `DateStyle=ISO` and
//! `TimeZone=UTC` on the replication connection, so dates and timestamps are ISO and
//! `timestamptz` ends in `+00`. The mapping, by column type OID (`pg_type.oid`):
//!
//! | PostgreSQL                         | JSON                                        |
//! |------------------------------------|---------------------------------------------|
//! | bool                               | `true` / `false`                            |
//! | int2, int4, int8, oid              | number                                      |
//! | float4, float8                     | number; NaN and ±Infinity as `null`         |
//! | numeric                            | string, exact (`"12.340"`); NaN, ±Infinity `null` |
//! | date                               | `"YYYY-MM-DD"`                              |
//! | timestamp, timestamptz             | `"YYYY-MM-DD HH:MM:SS[.ffffff]"` (UTC)      |
//! | json, jsonb                        | the document, nested                        |
//! | bytea                              | base64 string (or hex with `bytea = "hex"`) |
//! | arrays of the above                | JSON arrays (nested for multi-dimensional)  |
//! | everything else (text, uuid, ...)  | string as PostgreSQL prints it              |
//!
//! `infinity`, `-infinity` and BC dates have no StarRocks DATE/DATETIME value: `null`.

use std::borrow::Cow;

use base64::Engine as _;
use dbmazz_sdk::encoded::RawValue;
use dbmazz_sdk::Datum;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

/// How bytea values are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryAs {
    /// Standard base64 with padding.
    Base64,
    /// Lower-case hex, no prefix.
    Hex,
}

/// One value, borrowed from the batch. `None` in place of a cell means an unchanged
/// TOAST value (not sent, not to be written).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell<'a> {
    /// SQL NULL.
    Null,
    /// PostgreSQL's text form.
    Text(&'a str),
    /// Raw bytes (bytea, or a value in binary form).
    Bytes(&'a [u8]),
    /// A typed boolean.
    Bool(bool),
    /// A typed integer.
    Int(i64),
    /// A typed float.
    Float(f64),
}

impl<'a> Cell<'a> {
    /// The cell of a raw value; `None` for an unchanged TOAST value.
    pub fn from_raw(v: RawValue<'a>) -> Option<Cell<'a>> {
        match v {
            RawValue::Null => Some(Cell::Null),
            RawValue::UnchangedToast => None,
            RawValue::Text(t) => Some(Cell::Text(t)),
            RawValue::Binary(b) => Some(Cell::Bytes(b)),
        }
    }

    /// The cell of a typed value; `None` for an unchanged TOAST value.
    pub fn from_datum(d: &'a Datum) -> Option<Cell<'a>> {
        Some(match d {
            Datum::Null => Cell::Null,
            Datum::UnchangedToast => return None,
            Datum::Boolean(b) => Cell::Bool(*b),
            Datum::Int(i) => Cell::Int(*i),
            Datum::Float(f) => Cell::Float(*f),
            Datum::Numeric(t) | Datum::Text(t) | Datum::Json(t) => Cell::Text(t),
            Datum::Bytes(b) => Cell::Bytes(b),
        })
    }

    /// Appends the value's text as PostgreSQL prints it to `out`, for comparing keys.
    pub fn push_key_text(&self, out: &mut String) {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = match *self {
            Cell::Null => Ok(()),
            Cell::Text(t) => out.write_str(t),
            Cell::Bytes(b) => write!(out, "{b:?}"),
            Cell::Bool(b) => out.write_str(if b { "t" } else { "f" }),
            Cell::Int(i) => write!(out, "{i}"),
            Cell::Float(f) => write!(out, "{f}"),
        };
    }
}

/// A cell of a column of type `oid`, serializable as Stream Load JSON.
pub struct Json<'a> {
    /// Column type OID.
    pub oid: u32,
    /// The value.
    pub cell: Cell<'a>,
    /// bytea encoding.
    pub binary: BinaryAs,
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.cell {
            Cell::Null => s.serialize_unit(),
            Cell::Bool(b) => s.serialize_bool(b),
            Cell::Int(i) => s.serialize_i64(i),
            Cell::Float(f) if f.is_finite() => s.serialize_f64(f),
            Cell::Float(_) => s.serialize_unit(),
            Cell::Bytes(b) => s.serialize_str(&encode_binary(b, self.binary)),
            Cell::Text(t) => text(self.oid, t, self.binary, s),
        }
    }
}

fn encode_binary(b: &[u8], how: BinaryAs) -> String {
    match how {
        BinaryAs::Base64 => base64::engine::general_purpose::STANDARD.encode(b),
        BinaryAs::Hex => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

/// A date or timestamp that StarRocks can hold (years 0000-9999, not ±infinity, not BC).
fn datetime(t: &str) -> Option<&str> {
    let ok = t.len() >= 10 && t.as_bytes()[4] == b'-' && !t.ends_with(" BC");
    ok.then_some(t)
}

fn text<S: Serializer>(oid: u32, t: &str, binary: BinaryAs, s: S) -> Result<S::Ok, S::Error> {
    match oid {
        16 => s.serialize_bool(t == "t"),
        20 | 21 | 23 | 26 => match t.parse::<i64>() {
            Ok(i) => s.serialize_i64(i),
            Err(_) => s.serialize_str(t),
        },
        700 | 701 => match t.parse::<f64>() {
            Ok(f) if f.is_finite() => s.serialize_f64(f),
            _ => s.serialize_unit(),
        },
        1700 => match t {
            "NaN" | "Infinity" | "-Infinity" => s.serialize_unit(),
            _ => s.serialize_str(t),
        },
        1082 | 1114 => match datetime(t) {
            Some(v) => s.serialize_str(v),
            None => s.serialize_unit(),
        },
        1184 => match datetime(t) {
            Some(v) => s.serialize_str(v.strip_suffix("+00").unwrap_or(v)),
            None => s.serialize_unit(),
        },
        17 => match dbmazz_sdk::encoded::bytea(t) {
            Some(b) => s.serialize_str(&encode_binary(&b, binary)),
            None => s.serialize_str(t),
        },
        114 | 3802 => match sonic_rs::from_str::<sonic_rs::LazyValue<'_>>(t) {
            Ok(raw) => raw.serialize(s),
            Err(_) => s.serialize_str(t),
        },
        _ => match element_type(oid).and_then(|elem| parse_array(t).map(|a| (elem, a))) {
            Some((elem, items)) => ArrayJson {
                elem,
                items: &items,
                binary,
            }
            .serialize(s),
            None => s.serialize_str(t),
        },
    }
}

/// The element type of array type `oid`, for the array types this sink maps.
pub fn element_type(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1001 => 17,
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1028 => 26,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        1009 => 25,
        1014 => 1042,
        1015 => 1043,
        2951 => 2950,
        1182 => 1082,
        1115 => 1114,
        1185 => 1184,
        199 => 114,
        3807 => 3802,
        _ => return None,
    })
}

/// An element of a PostgreSQL array literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Elem<'a> {
    /// `NULL`.
    Null,
    /// An element's text (quotes and backslashes removed).
    Text(Cow<'a, str>),
    /// A nested dimension.
    Array(Vec<Elem<'a>>),
}

/// Parses an array's text form (`{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`,
/// `[0:1]={1,2}`); `None` when it is not one.
pub fn parse_array(t: &str) -> Option<Vec<Elem<'_>>> {
    let t = if t.starts_with('[') {
        &t[t.find('=')? + 1..]
    } else {
        t
    };
    let mut at = 0;
    let out = level(t, &mut at)?;
    (at == t.len()).then_some(out)
}

fn level<'a>(t: &'a str, at: &mut usize) -> Option<Vec<Elem<'a>>> {
    let b = t.as_bytes();
    if b.get(*at) != Some(&b'{') {
        return None;
    }
    *at += 1;
    let mut out = Vec::new();
    if b.get(*at) == Some(&b'}') {
        *at += 1;
        return Some(out);
    }
    loop {
        match *b.get(*at)? {
            b'{' => out.push(Elem::Array(level(t, at)?)),
            b'"' => {
                *at += 1;
                let start = *at;
                let mut owned: Option<String> = None;
                loop {
                    match *b.get(*at)? {
                        b'"' => break,
                        b'\\' => {
                            let s = owned.get_or_insert_with(|| t[start..*at].to_string());
                            *at += 1;
                            let c = t[*at..].chars().next()?;
                            s.push(c);
                            *at += c.len_utf8();
                        }
                        _ => {
                            let c = t[*at..].chars().next()?;
                            if let Some(s) = owned.as_mut() {
                                s.push(c);
                            }
                            *at += c.len_utf8();
                        }
                    }
                }
                out.push(Elem::Text(match owned {
                    Some(s) => Cow::Owned(s),
                    None => Cow::Borrowed(&t[start..*at]),
                }));
                *at += 1;
            }
            _ => {
                let start = *at;
                while !matches!(b.get(*at), Some(b',' | b'}') | None) {
                    *at += 1;
                }
                let item = t[start..*at].trim();
                out.push(if item.eq_ignore_ascii_case("NULL") {
                    Elem::Null
                } else {
                    Elem::Text(Cow::Borrowed(item))
                });
            }
        }
        match *b.get(*at)? {
            b',' => *at += 1,
            b'}' => {
                *at += 1;
                return Some(out);
            }
            _ => return None,
        }
    }
}

struct ArrayJson<'a, 'b> {
    elem: u32,
    items: &'b [Elem<'a>],
    binary: BinaryAs,
}

impl Serialize for ArrayJson<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.items.len()))?;
        for item in self.items {
            match item {
                Elem::Null => seq.serialize_element(&())?,
                Elem::Text(t) => seq.serialize_element(&Json {
                    oid: self.elem,
                    cell: Cell::Text(t),
                    binary: self.binary,
                })?,
                Elem::Array(inner) => seq.serialize_element(&ArrayJson {
                    elem: self.elem,
                    items: inner,
                    binary: self.binary,
                })?,
            }
        }
        seq.end()
    }
}

/// The StarRocks column type for a new column of PostgreSQL type `oid` with modifier
/// `typmod` (used by schema evolution; StarRocks docs, "Data types").
pub fn starrocks_type(oid: u32, typmod: i32) -> String {
    match oid {
        16 => "BOOLEAN".into(),
        21 => "SMALLINT".into(),
        23 => "INT".into(),
        20 | 26 => "BIGINT".into(),
        700 => "FLOAT".into(),
        701 => "DOUBLE".into(),
        1700 if typmod >= 4 => {
            let p = ((typmod - 4) >> 16) & 0xffff;
            let s = (typmod - 4) & 0xffff;
            format!("DECIMAL({},{})", p.min(38), s.min(p.min(38)))
        }
        1700 => "DECIMAL(38,9)".into(),
        1082 => "DATE".into(),
        1114 | 1184 => "DATETIME".into(),
        114 | 3802 => "JSON".into(),
        1043 | 1042 if typmod > 4 => format!("VARCHAR({})", ((typmod - 4) * 4).min(1_048_576)),
        2950 => "VARCHAR(36)".into(),
        other => match element_type(other) {
            Some(elem) => format!("ARRAY<{}>", starrocks_type(elem, -1)),
            None => "STRING".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(oid: u32, t: &str) -> String {
        sonic_rs::to_string(&Json {
            oid,
            cell: Cell::Text(t),
            binary: BinaryAs::Base64,
        })
        .unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(j(16, "t"), "true");
        assert_eq!(j(16, "f"), "false");
        assert_eq!(j(20, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(j(701, "1.5"), "1.5");
        assert_eq!(j(701, "NaN"), "null");
        assert_eq!(j(700, "-Infinity"), "null");
        assert_eq!(j(1700, "12.340"), "\"12.340\"");
        assert_eq!(j(1700, "NaN"), "null");
        assert_eq!(j(1082, "2024-02-29"), "\"2024-02-29\"");
        assert_eq!(j(1082, "infinity"), "null");
        assert_eq!(j(1082, "0044-03-15 BC"), "null");
        assert_eq!(
            j(1184, "2024-01-02 03:04:05.123456+00"),
            "\"2024-01-02 03:04:05.123456\""
        );
        assert_eq!(j(1114, "2024-01-02 03:04:05"), "\"2024-01-02 03:04:05\"");
        assert_eq!(j(3802, "{\"a\": [1, 2]}"), "{\"a\": [1, 2]}");
        assert_eq!(j(17, "\\xdeadbeef"), "\"3q2+7w==\"");
        assert_eq!(j(25, "say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(
            j(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\""
        );
        let hex = sonic_rs::to_string(&Json {
            oid: 17,
            cell: Cell::Text("\\x00ff"),
            binary: BinaryAs::Hex,
        })
        .unwrap();
        assert_eq!(hex, "\"00ff\"");
    }

    #[test]
    fn arrays() {
        assert_eq!(j(1007, "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(
            j(1009, "{\"a b\",\"c\\\"d\",NULL,plain}"),
            "[\"a b\",\"c\\\"d\",null,\"plain\"]"
        );
        assert_eq!(j(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(j(1007, "{}"), "[]");
        assert_eq!(j(1007, "[0:1]={5,6}"), "[5,6]");
        assert_eq!(j(1000, "{t,f}"), "[true,false]");
        assert_eq!(j(1231, "{1.50,NaN}"), "[\"1.50\",null]");
        assert_eq!(j(1009, "{\"ünï\",\"\\\\\"}"), "[\"ünï\",\"\\\\\"]");
        // not an array literal: the text as it is
        assert_eq!(j(1007, "{1,2"), "\"{1,2\"");
    }

    #[test]
    fn ddl_types() {
        assert_eq!(starrocks_type(1700, (10 << 16 | 2) + 4), "DECIMAL(10,2)");
        assert_eq!(starrocks_type(1043, 14), "VARCHAR(40)");
        assert_eq!(starrocks_type(1007, -1), "ARRAY<INT>");
        assert_eq!(starrocks_type(25, -1), "STRING");
        assert_eq!(starrocks_type(1184, -1), "DATETIME");
    }
}
