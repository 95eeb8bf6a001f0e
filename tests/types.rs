//! The type battery: one column of every built-in type that can be a column (and an
//! enum, a domain, a composite type), a few rows of ordinary and edge values each, and
//! what three sinks write for them compared with PostgreSQL's own text output of the same
//! row (`col::text` under the session settings the replication connection pins, which is
//! what `psql` prints with those settings):
//!
//! - the built-in JSONL sink, from the stream and from the initial snapshot (COPY),
//! - `sink-webhook` (built from source) into a real HTTP receiver,
//! - `sink-starrocks` (built from source) into the StarRocks test double
//!   (`tests/starrocks-double`: the documented Stream Load protocol, in memory, typed
//!   columns that refuse values a real StarRocks column would filter),
//! - `sink-postgres` (built from source) into a second database with the same table:
//!   there every value must read back as the same text.
//!
//! Where a sink writes something other than PostgreSQL's text, the expectation functions
//! below ([`jsonl`], [`webhook`], [`starrocks`]) state the mapping; everything else must be
//! the text, byte for byte. Runs on every PostgreSQL of the matrix (`DBMAZZ_TEST_PG`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Map, Value as Json};
use starrocks_double::StarRocksDouble;
use support::{plugins, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(120);

/// One column: name, PostgreSQL type (as in the DDL), the StarRocks column type its twin
/// gets (the sink README's mapping), and its values, one per row (rows past the end are
/// NULL; the last row of the table is NULL everywhere).
struct Col {
    name: &'static str,
    pg: &'static str,
    starrocks: &'static str,
    values: &'static [&'static str],
}

const fn col(
    name: &'static str,
    pg: &'static str,
    starrocks: &'static str,
    values: &'static [&'static str],
) -> Col {
    Col {
        name,
        pg,
        starrocks,
        values,
    }
}

const TYPES_SQL: &str = "CREATE TYPE mood AS ENUM ('sad', 'happy', 'very happy');
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b text);";

/// The battery. Values are SQL literals (cast to the column type on insert).
const COLS: &[Col] = &[
    col("i2", "int2", "SMALLINT", &["-32768", "32767", "0"]),
    col("i4", "int4", "INT", &["2147483647", "-2147483648"]),
    col(
        "i8",
        "int8",
        "BIGINT",
        &["-9223372036854775808", "9223372036854775807"],
    ),
    col(
        "n",
        "numeric",
        "DECIMAL(38,9)",
        &[
            "'-12345678901234567890.123456789'",
            "'NaN'",
            "'0.000000001'",
        ],
    ),
    col(
        "n_inf",
        "numeric",
        "DECIMAL(38,9)",
        &["'Infinity'", "'-Infinity'"],
    ),
    col(
        "n_scale",
        "numeric(10,3)",
        "DECIMAL(10,3)",
        &["1.5", "0", "-0.001"],
    ),
    col(
        "f4",
        "float4",
        "FLOAT",
        &["'0.1'", "'NaN'", "'3.4028235e38'", "'-0'"],
    ),
    col(
        "f4_inf",
        "float4",
        "FLOAT",
        &["'Infinity'", "'-Infinity'", "'1e-45'"],
    ),
    col(
        "f8",
        "float8",
        "DOUBLE",
        &[
            "'0.30000000000000004'",
            "'Infinity'",
            "'5e-324'",
            "'-1.7976931348623157e308'",
        ],
    ),
    col("f8_nan", "float8", "DOUBLE", &["'NaN'", "'-Infinity'"]),
    col(
        "m",
        "money",
        "STRING",
        &["'12.34'", "'-92233720368547758.08'"],
    ),
    col(
        "tx",
        "text",
        "STRING",
        &[
            r#"E'h\u00e9llo "q" \\ tab\t nl\n \u2603 \U0001F600'"#,
            "''",
            "'NULL'",
        ],
    ),
    col("vc", "varchar(10)", "VARCHAR(40)", &["'abc'", "''", "' '"]),
    col("bc", "char(3)", "STRING", &["'x'", "''", "'abc'"]),
    col("nm", "name", "STRING", &["'a_name'", "''"]),
    col("ch", "\"char\"", "STRING", &["'c'", "'Z'"]),
    col("by", "bytea", "STRING", &[r"'\x00ff10'", "''", r"'\x5c27'"]),
    col("b", "bool", "BOOLEAN", &["true", "false"]),
    col(
        "d",
        "date",
        "DATE",
        &[
            "'2024-02-29'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 BC'",
            "'5874897-12-31'",
        ],
    ),
    col(
        "tm",
        "time",
        "STRING",
        &[
            "'23:59:59.999999'",
            "'00:00:00'",
            "'24:00:00'",
            "'12:00:00.5'",
        ],
    ),
    col(
        "ttz",
        "timetz",
        "STRING",
        &["'12:34:56.789+05:30'", "'00:00:00-15:59'", "'24:00:00+00'"],
    ),
    col(
        "ts",
        "timestamp",
        "DATETIME",
        &[
            "'1999-12-31 23:59:59.5'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 12:00:00 BC'",
            "'294276-12-31 23:59:59.999999'",
        ],
    ),
    col(
        "tz",
        "timestamptz",
        "DATETIME",
        &[
            "'2024-01-02 03:04:05.123+02'",
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 12:00:00+00 BC'",
            "'1900-01-01 00:00:00+00'",
        ],
    ),
    col(
        "iv",
        "interval",
        "STRING",
        &[
            "'1 year 2 mons 3 days 04:05:06.789'",
            "'-178000000 years'",
            "'0'",
            "'-1 day +02:00'",
        ],
    ),
    col(
        "u",
        "uuid",
        "VARCHAR(36)",
        &[
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'00000000-0000-0000-0000-000000000000'",
        ],
    ),
    col(
        "j",
        "json",
        "JSON",
        &[
            r#"'{"a": [1, 2.50, "x"], "b": null, "big": 123456789012345678901234567890}'"#,
            "'[]'",
            "'\"s\"'",
            "'null'",
        ],
    ),
    col(
        "jb",
        "jsonb",
        "JSON",
        &[
            r#"'{"k": {"n": 1.5}, "arr": [true, null], "e": 1e-7}'"#,
            "'{}'",
            "'3'",
        ],
    ),
    col(
        "x",
        "xml",
        "STRING",
        &[r#"'<a x="1">t&amp;</a>'"#, "'plain'"],
    ),
    col("ip", "inet", "STRING", &["'192.168.0.1/24'", "'::1'"]),
    col(
        "cidr_",
        "cidr",
        "STRING",
        &["'10.0.0.0/8'", "'2001:db8::/32'"],
    ),
    col("mac", "macaddr", "STRING", &["'08:00:2b:01:02:03'"]),
    col("mac8", "macaddr8", "STRING", &["'08:00:2b:01:02:03:04:05'"]),
    col("bt", "bit(4)", "STRING", &["B'1010'", "B'0000'"]),
    col("vb", "varbit", "STRING", &["B'1'", "B''"]),
    col(
        "ia",
        "int4[]",
        "ARRAY<INT>",
        &["'{1,NULL,3}'", "'{}'", "'[2:3]={7,8}'"],
    ),
    col(
        "ia2",
        "int4[]",
        "ARRAY<ARRAY<INT>>",
        &["'{{1,2},{3,NULL}}'"],
    ),
    col(
        "ta",
        "text[]",
        "ARRAY<STRING>",
        &[r#"'{"a b",NULL,"\"q\"","NULL","",x\\y}'"#, "'{}'"],
    ),
    col(
        "na",
        "numeric[]",
        "ARRAY<DECIMAL(38,9)>",
        &["'{1.5,-2,0.000000001}'"],
    ),
    col("fa", "float8[]", "ARRAY<DOUBLE>", &["'{1.5,-0.25,1e300}'"]),
    col("ba", "bool[]", "ARRAY<BOOLEAN>", &["'{t,f,NULL}'"]),
    col(
        "da",
        "date[]",
        "ARRAY<DATE>",
        &["'{2024-01-01,1970-01-01}'"],
    ),
    col(
        "tsa",
        "timestamp[]",
        "ARRAY<DATETIME>",
        &[r#"'{"2024-01-01 00:00:00","2024-01-01 12:30:00.25"}'"#],
    ),
    col(
        "ua",
        "uuid[]",
        "ARRAY<VARCHAR(36)>",
        &["'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'"],
    ),
    col(
        "ja",
        "jsonb[]",
        "ARRAY<JSON>",
        &[r#"'{"{\"a\": 1}","[1, 2]"}'"#],
    ),
    col(
        "bya",
        "bytea[]",
        "ARRAY<STRING>",
        &[r#"'{"\\x00ff",NULL}'"#],
    ),
    col(
        "r4",
        "int4range",
        "STRING",
        &["'[1,10)'", "'empty'", "'(,5]'"],
    ),
    col("rn", "numrange", "STRING", &["'[1.5,2.5]'"]),
    col(
        "rtz",
        "tstzrange",
        "STRING",
        &["'[2024-01-01 00:00:00+00,infinity)'"],
    ),
    col("rd", "daterange", "STRING", &["'[2024-01-01,2024-02-01)'"]),
    col(
        "mr",
        "int4multirange",
        "STRING",
        &["'{[1,3),[5,7)}'", "'{}'"],
    ),
    col("en", "mood", "STRING", &["'very happy'", "'sad'"]),
    col("dom", "posint", "INT", &["5", "2147483647"]),
    col("comp", "pair", "STRING", &[r#"'(1,"x y")'"#, "'(,)'"]),
    col("tsv", "tsvector", "STRING", &["'a fat cat sat'"]),
    col("tsq", "tsquery", "STRING", &["'fat & (cat | rat)'"]),
    col("o", "oid", "BIGINT", &["4294967295", "0"]),
    col("rc", "regclass", "STRING", &["'pg_class'"]),
    col("rt", "regtype", "STRING", &["'integer'"]),
    col("lsn", "pg_lsn", "STRING", &["'16/B374D848'", "'0/0'"]),
    col("pt", "point", "STRING", &["'(1.5,-2)'"]),
    col("bx", "box", "STRING", &["'(1,1),(0,0)'"]),
    col("ci", "circle", "STRING", &["'<(0,0),1.5>'"]),
    col("pth", "path", "STRING", &["'[(0,0),(1,1)]'"]),
    col("snap", "pg_snapshot", "STRING", &["'10:20:10,14,15'"]),
];

/// Rows in the table: the longest value list, plus the all-NULL row.
fn rows() -> usize {
    COLS.iter().map(|c| c.values.len()).max().unwrap_or(0) + 1
}

/// The session settings dbmazz's replication connection pins
/// (`host/src/source/replication.rs`), so `::text` here is what the walsender sends.
const SESSION: &str = "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = UTC;
    SET extra_float_digits = 3; SET bytea_output = hex;";

/// PostgreSQL's text output of every column of every row, by row id: the simple query
/// protocol returns each value's output function text, exactly what `psql` prints.
async fn psql_text(db: &tokio_postgres::Client) -> BTreeMap<i32, Vec<Option<String>>> {
    let list: Vec<&str> = COLS.iter().map(|c| c.name).collect();
    let sql = format!(
        "{SESSION} SELECT id, {} FROM battery ORDER BY id",
        list.join(", ")
    );
    db.simple_query(&sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .map(|r| {
            let id: i32 = r.get(0).unwrap().parse().unwrap();
            (
                id,
                (1..=COLS.len())
                    .map(|i| r.get(i).map(String::from))
                    .collect(),
            )
        })
        .collect()
}

fn number(text: &str) -> Json {
    if let Ok(i) = text.parse::<i64>() {
        return json!(i);
    }
    if let Ok(u) = text.parse::<u64>() {
        return json!(u);
    }
    let f: f64 = text.parse().unwrap();
    json!(f)
}

fn is_float(pg: &str) -> bool {
    matches!(pg, "float4" | "float8")
}

fn is_int(pg: &str) -> bool {
    matches!(pg, "int2" | "int4" | "int8" | "oid")
}

fn is_special_float(text: &str) -> bool {
    matches!(text, "NaN" | "Infinity" | "-Infinity")
}

/// The built-in JSONL sink: bool, integers and finite floats as JSON scalars; json/jsonb
/// nested; everything else (NaN/±Infinity too) the text as PostgreSQL prints it.
fn jsonl(pg: &str, sr: &str, text: Option<&str>) -> Json {
    let _ = sr;
    let Some(t) = text else { return Json::Null };
    match pg {
        "bool" => json!(t == "t"),
        p if is_int(p) => number(t),
        p if is_float(p) && !is_special_float(t) => number(t),
        "json" | "jsonb" => serde_json::from_str(t).unwrap(),
        _ => json!(t),
    }
}

/// `sink-webhook` (Debezium envelope): as JSONL, except bytea as base64 (Debezium's
/// default `binary.handling.mode`).
fn webhook(pg: &str, sr: &str, text: Option<&str>) -> Json {
    match (pg, text) {
        ("bytea", Some(t)) => {
            let raw = hex(t.strip_prefix("\\x").unwrap());
            json!(base64::engine::general_purpose::STANDARD.encode(raw))
        }
        _ => jsonl(pg, sr, text),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `sink-starrocks`: the README's type mapping. Values a StarRocks column cannot hold
/// (NaN, ±Infinity, infinite or BC dates, years past 9999) load as `null`; timestamps
/// lose their zone (UTC); arrays of the listed element types become JSON arrays, nested
/// per dimension (lower bounds are not kept); bytea as base64. A domain arrives as text
/// (the stream names the domain's type, not its base type; StarRocks casts the text to
/// the column's type, `INT` here).
fn starrocks(pg: &str, sr: &str, text: Option<&str>) -> Json {
    let Some(t) = text else { return Json::Null };
    match pg {
        "bool" => json!(t == "t"),
        p if is_int(p) => number(t),
        p if is_float(p) => {
            if is_special_float(t) {
                Json::Null
            } else {
                number(t)
            }
        }
        p if p.starts_with("numeric") && !p.ends_with("[]") => {
            if is_special_float(t) {
                Json::Null
            } else {
                json!(t)
            }
        }
        "date" => date_or_null(t).map_or(Json::Null, |d| json!(d)),
        "timestamp" | "timestamptz" => {
            let t = t.strip_suffix("+00").unwrap_or(t);
            match t.split_once(' ') {
                Some((d, time)) if date_or_null(d).is_some() && !time.contains("BC") => json!(t),
                _ => Json::Null,
            }
        }
        "json" | "jsonb" => serde_json::from_str(t).unwrap(),
        "bytea" => webhook(pg, sr, text),
        p if sr.starts_with("ARRAY") => array(p, t),
        _ => json!(t),
    }
}

/// A `YYYY-MM-DD` date StarRocks can hold (years 0000–9999, not BC, not infinite).
fn date_or_null(t: &str) -> Option<&str> {
    let y = t.split('-').next()?;
    (y.len() == 4 && !t.contains(' ') && y.bytes().all(|b| b.is_ascii_digit())).then_some(t)
}

/// A PostgreSQL array literal as nested JSON, elements mapped like the element type.
fn array(pg: &str, text: &str) -> Json {
    let text = match text.find('=') {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let elem = pg.strip_suffix("[]").unwrap();
    let (v, rest) = parse_array(elem, text.as_bytes());
    assert!(rest.is_empty(), "trailing {rest:?} in {text}");
    v
}

fn parse_array<'a>(elem: &str, b: &'a [u8]) -> (Json, &'a [u8]) {
    assert_eq!(b[0], b'{');
    let mut out = Vec::new();
    let mut b = &b[1..];
    if b[0] == b'}' {
        return (Json::Array(out), &b[1..]);
    }
    loop {
        if b[0] == b'{' {
            let (v, rest) = parse_array(elem, b);
            out.push(v);
            b = rest;
        } else {
            let (raw, quoted, rest) = element(b);
            b = rest;
            out.push(if !quoted && raw == "NULL" {
                Json::Null
            } else if elem == "jsonb" {
                serde_json::from_str(&raw).unwrap()
            } else {
                starrocks(elem, "", Some(&raw))
            });
        }
        match b[0] {
            b',' => b = &b[1..],
            b'}' => return (Json::Array(out), &b[1..]),
            c => panic!("unexpected {:?}", c as char),
        }
    }
}

fn element(b: &[u8]) -> (String, bool, &[u8]) {
    let mut s = Vec::new();
    if b[0] == b'"' {
        let mut i = 1;
        while b[i] != b'"' {
            if b[i] == b'\\' {
                i += 1;
            }
            s.push(b[i]);
            i += 1;
        }
        (String::from_utf8(s).unwrap(), true, &b[i + 1..])
    } else {
        let end = b.iter().position(|&c| c == b',' || c == b'}').unwrap();
        (
            String::from_utf8(b[..end].to_vec()).unwrap(),
            false,
            &b[end..],
        )
    }
}

/// Rows (JSON objects with an `id`) by id.
fn by_id<'a>(rows: impl Iterator<Item = &'a Json>) -> BTreeMap<i32, Map<String, Json>> {
    rows.map(|r| {
        let r = r.as_object().unwrap().clone();
        (r["id"].as_i64().unwrap() as i32, r)
    })
    .collect()
}

/// Polls `pred` every 50 ms until it holds (true) or `timeout` passes (false).
fn within(timeout: Duration, pred: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !pred() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Compares what a sink wrote with the expectation, column by column; returns the
/// differences as readable lines.
fn diff(
    sink: &str,
    expect: fn(&str, &str, Option<&str>) -> Json,
    want: &BTreeMap<i32, Vec<Option<String>>>,
    got: &BTreeMap<i32, Map<String, Json>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (id, texts) in want {
        let Some(row) = got.get(id) else {
            out.push(format!("{sink}: row {id} missing"));
            continue;
        };
        for (c, text) in COLS.iter().zip(texts) {
            let e = expect(c.pg, c.starrocks, text.as_deref());
            let g = row.get(c.name).cloned().unwrap_or(json!("<absent>"));
            if !same(&e, &g) {
                out.push(format!(
                    "{sink}: row {id} {} {}: PostgreSQL {:?} → expected {e}, got {g}",
                    c.name, c.pg, text
                ));
            }
        }
    }
    out
}

/// JSON equality, numbers by value (`1.5` = `1.50`, `-0` = `0`).
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => match (x.as_i128(), y.as_i128()) {
            (Some(a), Some(b)) => a == b,
            _ => x.as_f64() == y.as_f64(),
        },
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_builtin_type_arrives_as_postgresql_prints_it() {
    let pg = Pg::start("");
    let db = pg.client().await;
    let cols: Vec<String> = COLS
        .iter()
        .map(|c| format!("{} {}", c.name, c.pg))
        .collect();
    db.batch_execute(&format!(
        "{TYPES_SQL}\nCREATE TABLE battery (id int PRIMARY KEY, {});",
        cols.join(", ")
    ))
    .await
    .unwrap();

    // the three consumers, each with its own slot and publication
    let source = |name: &str| format!("slot = \"{name}_slot\"\npublication = \"{name}_pub\"\n");
    let pipeline = "[pipeline]\nflush_interval_ms = 50\n\n";
    // a pipeline into the JSONL sink, writing to its own `output`
    let jsonl_pipeline = |name: &str| {
        let p = Pipeline::with_source_toml(
            &pg.url(),
            &["battery"],
            &source(name),
            &format!("{pipeline}[sink]\nkind = \"jsonl\"\npath = \"OUT\"\n"),
        );
        p.edit_config("\"OUT\"", &format!("{:?}", p.output.display().to_string()));
        p
    };
    let jl = jsonl_pipeline("jsonl");

    let rx = Receiver::start(&[]).await;
    let wh = Pipeline::with_source_toml(
        &pg.url(),
        &["battery"],
        &source("webhook"),
        &format!(
            "{pipeline}[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
            plugins().webhook.display().to_string(),
            rx.url(),
            rx.addr.to_string()
        ),
    );

    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    let mut twin: Vec<(&str, &str)> = vec![("id", "INT")];
    twin.extend(COLS.iter().map(|c| (c.name, c.starrocks)));
    sr.create_table("app", "battery", &twin, &["id"]);
    let srp = Pipeline::with_source_toml(
        &pg.url(),
        &["battery"],
        &source("starrocks"),
        &format!(
            "{pipeline}[sink]\nplugin = {:?}\n\
             config = {{ url = {:?}, database = \"app\", user = \"root\", password = \"pw\" }}\n\
             capabilities = {{ http = [\"{}\", \"{}\"] }}\n",
            plugins().starrocks.display().to_string(),
            sr.fe_url(),
            sr.fe_addr(),
            sr.be_addr(),
        ),
    );
    // sink-postgres into database `replica`, holding the same types and table
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {}", support::USER));
    let replica_url = pg.url_of("replica");
    let replica = support::connect(&replica_url).await;
    replica
        .batch_execute(&format!(
            "{TYPES_SQL}\nCREATE TABLE battery (id int PRIMARY KEY, {});",
            cols.join(", ")
        ))
        .await
        .unwrap();
    let pgp = Pipeline::with_source_toml(
        &pg.url(),
        &["battery"],
        &source("postgres"),
        &format!(
            "{pipeline}[sink]\nplugin = {:?}\nconfig = {{ connection = \"replica\" }}\n\
             capabilities = {{ postgres = [\"replica\"] }}\n\n[connections.replica]\nurl = {replica_url:?}\n",
            plugins().postgres.display().to_string(),
        ),
    );
    let running = [jl.spawn(), wh.spawn(), srp.spawn(), pgp.spawn()];
    for d in &running {
        d.wait_log("streaming", T);
    }

    for row in 0..rows() {
        let (names, values): (Vec<&str>, Vec<String>) = COLS
            .iter()
            .filter_map(|c| Some((c.name, format!("CAST({} AS {})", c.values.get(row)?, c.pg))))
            .unzip();
        let sql = if names.is_empty() {
            format!("INSERT INTO battery (id) VALUES ({row})")
        } else {
            format!(
                "INSERT INTO battery (id, {}) VALUES ({row}, {})",
                names.join(", "),
                values.join(", ")
            )
        };
        db.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let want = psql_text(&db).await;
    assert_eq!(want.len(), rows());

    // JSONL
    let lines = jl.wait_for(&running[0], T, "the battery rows", |c| c.len() >= rows());
    let got = by_id(lines.iter().map(|l| &l["new"]));
    let mut problems = diff("jsonl", jsonl, &want, &got);
    // numbers beyond f64 inside a json document keep every digit
    let raw = std::fs::read_to_string(&jl.output).unwrap();
    if !raw.contains("123456789012345678901234567890") {
        problems.push("jsonl: a json number lost digits".into());
    }

    // sink-webhook
    if !within(T, || rx.events().len() >= rows()) {
        problems.push(format!("webhook: rows missing\n{}", running[1].log()));
    }
    let events = rx.events();
    let got = by_id(events.iter().map(|e| &e["data"]["after"]));
    problems.extend(diff("webhook", webhook, &want, &got));
    let bodies: String = rx
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    if !bodies.contains("123456789012345678901234567890") {
        problems.push("webhook: a json number lost digits".into());
    }

    // the initial snapshot (COPY, not the stream) of the same rows, into JSONL
    let snap = jsonl_pipeline("snapshot");
    let copying = snap.spawn();
    let lines = snap.wait_for(&copying, T, "the snapshot rows", |c| c.len() >= rows());
    assert!(lines.iter().all(|l| l["op"] == "read"), "{lines:?}");
    let got = by_id(lines.iter().map(|l| &l["new"]));
    problems.extend(diff("snapshot", jsonl, &want, &got));

    // sink-starrocks
    if !within(T, || sr.rows("app", "battery").len() >= rows()) {
        let log = running[2].log();
        // the double's error log names the column it filtered
        let details: Vec<String> = log
            .split("details: http://")
            .skip(1)
            .filter_map(|rest| {
                let url = rest.split_whitespace().next()?;
                let (addr, path) = url.split_once('/')?;
                Some(support::http_get(addr, &format!("/{path}")).1)
            })
            .collect();
        problems.push(format!(
            "starrocks: rows missing\n{log}\n{}",
            details.join("\n")
        ));
    }
    let rows_sr: Vec<Json> = sr
        .rows("app", "battery")
        .into_iter()
        .map(Json::Object)
        .collect();
    let got = by_id(rows_sr.iter());
    problems.extend(diff("starrocks", starrocks, &want, &got));

    // sink-postgres: the same text, byte for byte
    let count = || async {
        replica
            .query_one("SELECT count(*) FROM battery", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let start = std::time::Instant::now();
    while count().await < rows() as i64 && start.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copied = psql_text(&replica).await;
    if copied != want {
        for (id, row) in &want {
            let other = copied.get(id);
            for (i, c) in COLS.iter().enumerate() {
                let theirs = other.and_then(|r| r[i].as_ref());
                if theirs != row[i].as_ref() {
                    problems.push(format!(
                        "postgres: row {id} {} ({}): {:?} read back as {:?}",
                        c.name, c.pg, row[i], theirs
                    ));
                }
            }
        }
        if copied.len() != want.len() {
            problems.push(format!(
                "postgres: {} rows of {}\n{}",
                copied.len(),
                want.len(),
                running[3].log()
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
