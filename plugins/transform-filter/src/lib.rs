//! `transform-filter`: decides which changes go on, and what they show.
//!
//! Configuration (the stage's `config` table):
//!
//! | key | meaning | example |
//! |-----|---------|---------|
//! | `include_tables` | only these tables (globs on `schema.table`; `*` any run, `?` one char) | `["public.*"]` |
//! | `exclude_tables` | not these tables (applied after include) | `"public.audit_*"` |
//! | `where` | keep only rows matching all predicates, joined by `and`: `col = v`, `col != v`, `col < n`, `col > n`, `col in (v1, v2)`, `col is null`, `col is not null`; strings in single quotes. Tested on the new row (the old row for deletes); tables without the columns are not filtered | `"status = 'paid' and amount > 10"` |
//! | `drop_columns` | remove these columns (`col` in every table, or `schema.table.col`) | `["email"]` |
//! | `mask_columns` | replace these columns' values | `["public.users.phone"]` |
//! | `mask` | `"sha256"` (hex SHA-256 of the value's text) or a fixed string; default `"***"` | `"sha256"` |
//!
//! Result: keep-all when nothing is filtered, the kept indices when only rows are
//! filtered, replacement changes (and relations) when columns are dropped or masked.

use dbmazz_sdk::encoded::{self, ChangeView};
use dbmazz_sdk::EncodedBatch;
use dbmazz_sdk::{
    export_transform, Batch, Change, Config, ConfigType, Datum, Metadata, Relation, Row, Transform,
    TransformResult,
};
use sha2::{Digest, Sha256};

/// `*` and `?` globs.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A literal in a predicate.
#[derive(Clone, Debug, PartialEq)]
pub enum Lit {
    /// `'text'`
    Str(String),
    /// a number
    Num(f64),
}

/// One predicate.
#[derive(Clone, Debug, PartialEq)]
pub enum Pred {
    /// `col = v`
    Eq(String, Lit),
    /// `col != v`
    Ne(String, Lit),
    /// `col < n`
    Lt(String, Lit),
    /// `col > n`
    Gt(String, Lit),
    /// `col in (v, ...)`
    In(String, Vec<Lit>),
    /// `col is null`
    IsNull(String),
    /// `col is not null`
    NotNull(String),
}

impl Pred {
    fn column(&self) -> &str {
        match self {
            Pred::Eq(c, _)
            | Pred::Ne(c, _)
            | Pred::Lt(c, _)
            | Pred::Gt(c, _)
            | Pred::In(c, _)
            | Pred::IsNull(c)
            | Pred::NotNull(c) => c,
        }
    }
}

fn lit(s: &str) -> Result<Lit, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Ok(Lit::Str(inner.replace("''", "'")));
    }
    s.parse()
        .map(Lit::Num)
        .map_err(|_| format!("{s:?} is neither a number nor a 'quoted string'"))
}

/// Parses a `where` expression.
pub fn parse_where(expr: &str) -> Result<Vec<Pred>, String> {
    let mut out = Vec::new();
    for part in expr.split(" and ").map(str::trim).filter(|p| !p.is_empty()) {
        let lower = part.to_ascii_lowercase();
        let pred = if let Some(col) = lower.strip_suffix(" is not null") {
            Pred::NotNull(part[..col.len()].trim().to_string())
        } else if let Some(col) = lower.strip_suffix(" is null") {
            Pred::IsNull(part[..col.len()].trim().to_string())
        } else if let Some(i) = lower.find(" in ") {
            let list = part[i + 4..].trim();
            let inner = list
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("where: {part:?}: expected col in (v1, v2)"))?;
            Pred::In(
                part[..i].trim().to_string(),
                inner.split(',').map(lit).collect::<Result<_, _>>()?,
            )
        } else if let Some(i) = part.find("!=") {
            Pred::Ne(part[..i].trim().to_string(), lit(&part[i + 2..])?)
        } else if let Some(i) = part.find('=') {
            Pred::Eq(part[..i].trim().to_string(), lit(&part[i + 1..])?)
        } else if let Some(i) = part.find('<') {
            Pred::Lt(part[..i].trim().to_string(), lit(&part[i + 1..])?)
        } else if let Some(i) = part.find('>') {
            Pred::Gt(part[..i].trim().to_string(), lit(&part[i + 1..])?)
        } else {
            return Err(format!(
                "where: cannot read {part:?}: use =, !=, <, >, in (...), is null, is not null"
            ));
        };
        out.push(pred);
    }
    Ok(out)
}

fn num(d: &Datum) -> Option<f64> {
    match d {
        Datum::Int(i) => Some(*i as f64),
        Datum::Float(f) => Some(*f),
        Datum::Numeric(s) | Datum::Text(s) => s.parse().ok(),
        _ => None,
    }
}

fn equals(d: &Datum, l: &Lit) -> bool {
    match (d, l) {
        (Datum::Text(s) | Datum::Numeric(s) | Datum::Json(s), Lit::Str(v)) => s == v,
        (Datum::Boolean(b), Lit::Str(v)) => (v == "true" || v == "t") == *b,
        (d, Lit::Num(n)) => num(d) == Some(*n),
        _ => false,
    }
}

fn matches(p: &Pred, d: &Datum) -> bool {
    match p {
        Pred::Eq(_, l) => equals(d, l),
        Pred::Ne(_, l) => !matches!(d, Datum::Null) && !equals(d, l),
        Pred::Lt(_, Lit::Num(n)) => num(d).is_some_and(|v| v < *n),
        Pred::Gt(_, Lit::Num(n)) => num(d).is_some_and(|v| v > *n),
        Pred::Lt(_, Lit::Str(s)) => matches!(d, Datum::Text(t) if t.as_str() < s.as_str()),
        Pred::Gt(_, Lit::Str(s)) => matches!(d, Datum::Text(t) if t.as_str() > s.as_str()),
        Pred::In(_, ls) => ls.iter().any(|l| equals(d, l)),
        Pred::IsNull(_) => matches!(d, Datum::Null),
        Pred::NotNull(_) => !matches!(d, Datum::Null),
    }
}

/// How masked values are replaced.
#[derive(Clone, Debug, PartialEq)]
pub enum Mask {
    /// A fixed string.
    Fixed(String),
    /// Hex SHA-256 of the value's text form.
    Sha256,
}

/// The filter's settings.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    include: Vec<String>,
    exclude: Vec<String>,
    predicates: Vec<Pred>,
    drop: Vec<String>,
    mask_columns: Vec<String>,
    mask: Option<Mask>,
}

fn column_matches(spec: &str, rel: &Relation, column: &str) -> bool {
    match spec.rsplit_once('.') {
        Some((table, col)) => col == column && glob(table, &rel.qualified_name()),
        None => spec == column,
    }
}

fn text_of(d: &Datum) -> String {
    match d {
        Datum::Null | Datum::UnchangedToast => String::new(),
        Datum::Boolean(b) => b.to_string(),
        Datum::Int(i) => i.to_string(),
        Datum::Float(f) => f.to_string(),
        Datum::Numeric(s) | Datum::Text(s) | Datum::Json(s) => s.clone(),
        Datum::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

impl Filter {
    /// True when the change's table passes include/exclude.
    pub fn table_passes(&self, rel: &Relation) -> bool {
        let name = rel.qualified_name();
        (self.include.is_empty() || self.include.iter().any(|g| glob(g, &name)))
            && !self.exclude.iter().any(|g| glob(g, &name))
    }

    /// True when the row passes the `where` predicates.
    pub fn row_passes(&self, rel: &Relation, change: &Change) -> bool {
        let values = change.new.as_ref().or(change.old.as_ref());
        let Some(values) = values else { return true };
        let row = Row::new(rel, values);
        self.predicates.iter().all(|p| match row.get(p.column()) {
            None => true, // the table has no such column: not filtered
            Some(Datum::UnchangedToast) => true,
            Some(d) => matches(p, d),
        })
    }

    fn masked(&self, d: &Datum) -> Datum {
        match (d, &self.mask) {
            (Datum::Null | Datum::UnchangedToast, _) => d.clone(),
            (_, Some(Mask::Sha256)) => {
                let h = Sha256::digest(text_of(d).as_bytes());
                Datum::Text(h.iter().map(|b| format!("{b:02x}")).collect())
            }
            (_, Some(Mask::Fixed(s))) => Datum::Text(s.clone()),
            (_, None) => Datum::Text("***".into()),
        }
    }

    /// `row_passes` on an encoded change: decodes only the predicates' columns.
    pub fn encoded_row_passes(
        &self,
        rel: &Relation,
        change: &ChangeView<'_>,
    ) -> Result<bool, String> {
        let Some(values) = change.new.or(change.old) else {
            return Ok(true);
        };
        for p in &self.predicates {
            let Some(i) = rel.columns.iter().position(|c| c.name == p.column()) else {
                continue;
            };
            let Some(raw) = values.get(i) else { continue };
            let d = encoded::datum(rel.columns[i].type_oid, raw?);
            if !matches!(d, Datum::UnchangedToast) && !matches(p, &d) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// [`Filter::apply`] on the compact encoding (only used when no column is dropped or
    /// masked).
    pub fn apply_encoded(&self, batch: &EncodedBatch) -> Result<TransformResult, String> {
        let mut keep = Vec::new();
        for (i, c) in batch.changes().enumerate() {
            let c = c?;
            let Some(rel) = batch.relation(c.relation) else {
                continue;
            };
            if self.table_passes(rel) && self.encoded_row_passes(rel, &c)? {
                keep.push(i as u32);
            }
        }
        Ok(if keep.len() == batch.count as usize {
            TransformResult::KeepAll
        } else {
            TransformResult::Keep(keep)
        })
    }

    fn reshapes(&self) -> bool {
        !self.drop.is_empty() || !self.mask_columns.is_empty()
    }

    /// Applies the filter to a batch.
    pub fn apply(&self, batch: &Batch) -> TransformResult {
        let mut keep = Vec::new();
        for (i, c) in batch.changes.iter().enumerate() {
            let Some(rel) = batch.relation_of(c) else {
                continue;
            };
            if self.table_passes(rel) && self.row_passes(rel, c) {
                keep.push(i as u32);
            }
        }
        if !self.reshapes() {
            return if keep.len() == batch.changes.len() {
                TransformResult::KeepAll
            } else {
                TransformResult::Keep(keep)
            };
        }
        // Drop and mask columns: new relations and changes.
        let mut relations = Vec::new();
        let mut plans = Vec::new(); // per relation id: (kept column indices, masked flags)
        for rel in &batch.relations {
            let kept: Vec<usize> = (0..rel.columns.len())
                .filter(|&i| {
                    !self
                        .drop
                        .iter()
                        .any(|s| column_matches(s, rel, &rel.columns[i].name))
                })
                .collect();
            let masked: Vec<bool> = kept
                .iter()
                .map(|&i| {
                    self.mask_columns
                        .iter()
                        .any(|s| column_matches(s, rel, &rel.columns[i].name))
                })
                .collect();
            relations.push(Relation {
                columns: kept.iter().map(|&i| rel.columns[i].clone()).collect(),
                ..rel.clone()
            });
            plans.push((rel.id, kept, masked));
        }
        let reshape = |rel_id: u32, values: &Option<Vec<Datum>>| -> Option<Vec<Datum>> {
            let (_, kept, masked) = plans.iter().find(|(id, _, _)| *id == rel_id)?;
            values.as_ref().map(|v| {
                kept.iter()
                    .zip(masked)
                    .map(|(&i, &m)| {
                        let d = v.get(i).cloned().unwrap_or(Datum::Null);
                        if m {
                            self.masked(&d)
                        } else {
                            d
                        }
                    })
                    .collect()
            })
        };
        let changes = keep
            .iter()
            .map(|&i| {
                let c = &batch.changes[i as usize];
                Change {
                    old: reshape(c.relation, &c.old),
                    new: reshape(c.relation, &c.new),
                    ..c.clone()
                }
            })
            .collect();
        TransformResult::Replace((relations, changes))
    }
}

impl Transform for Filter {
    fn metadata() -> Metadata {
        use ConfigType::{Any, Text};
        Metadata::keys()
            .key(
                "include_tables",
                Any,
                None,
                "only these tables: globs on schema.table, an array or comma-separated text",
            )
            .key(
                "exclude_tables",
                Any,
                None,
                "not these tables: an array or comma-separated text",
            )
            .key(
                "where",
                Text,
                None,
                "keep rows matching column = 'value' [and ...]",
            )
            .key(
                "drop_columns",
                Any,
                None,
                "columns removed: col (every table) or schema.table.col",
            )
            .key("mask_columns", Any, None, "columns masked")
            .key(
                "mask",
                Text,
                Some("***"),
                "\"sha256\" (hex SHA-256 of the text) or a fixed replacement",
            )
    }

    fn init(config: &Config) -> Result<Self, String> {
        let mask = match config.get("mask") {
            None => None,
            Some("sha256") => Some(Mask::Sha256),
            Some(s) => Some(Mask::Fixed(s.to_string())),
        };
        for key in config
            .entries()
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !k.starts_with("dbmazz."))
        {
            if ![
                "include_tables",
                "exclude_tables",
                "where",
                "drop_columns",
                "mask_columns",
                "mask",
            ]
            .contains(&key)
            {
                return Err(format!("unknown config key {key:?}: expected include_tables, exclude_tables, where, drop_columns, mask_columns, mask"));
            }
        }
        Ok(Filter {
            include: config.list("include_tables"),
            exclude: config.list("exclude_tables"),
            predicates: config
                .get("where")
                .map(parse_where)
                .transpose()?
                .unwrap_or_default(),
            drop: config.list("drop_columns"),
            mask_columns: config.list("mask_columns"),
            mask,
        })
    }

    fn process(&mut self, batch: &Batch) -> Result<TransformResult, String> {
        Ok(self.apply(batch))
    }

    /// Selecting rows needs no typed values; dropping or masking columns builds
    /// replacement changes, which the typed path does.
    fn prefers_encoded(&self) -> bool {
        !self.reshapes()
    }

    fn process_encoded(&mut self, batch: &EncodedBatch) -> Result<TransformResult, String> {
        if self.reshapes() {
            return Ok(self.apply(&batch.decode()?));
        }
        self.apply_encoded(batch)
    }
}

export_transform!(Filter);

#[cfg(test)]
mod tests {
    use super::*;
    use dbmazz_sdk::testing::BatchBuilder;
    use dbmazz_sdk::Op;

    fn cfg(kv: &[(&str, &str)]) -> Config {
        Config::new(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn batch() -> Batch {
        BatchBuilder::new(1)
            .table(
                1,
                "public",
                "orders",
                &[
                    ("id", 23, true),
                    ("status", 25, false),
                    ("amount", 1700, false),
                    ("email", 25, false),
                ],
            )
            .table(2, "public", "audit_log", &[("id", 23, true)])
            .change(
                Op::Insert,
                1,
                None,
                Some(vec![
                    Datum::Int(1),
                    Datum::Text("paid".into()),
                    Datum::Numeric("12.50".into()),
                    Datum::Text("a@b.c".into()),
                ]),
            )
            .change(
                Op::Insert,
                1,
                None,
                Some(vec![
                    Datum::Int(2),
                    Datum::Text("new".into()),
                    Datum::Numeric("5".into()),
                    Datum::Null,
                ]),
            )
            .change(Op::Insert, 2, None, Some(vec![Datum::Int(9)]))
            .change(
                Op::Delete,
                1,
                Some(vec![
                    Datum::Int(3),
                    Datum::Text("paid".into()),
                    Datum::Numeric("99".into()),
                    Datum::Null,
                ]),
                None,
            )
            .build()
    }

    #[test]
    fn globs() {
        assert!(glob("public.*", "public.orders"));
        assert!(glob("public.audit_*", "public.audit_log"));
        assert!(!glob("public.audit_*", "public.orders"));
        assert!(glob("*.t?", "x.ta"));
    }

    #[test]
    fn keep_all_and_exclude() {
        let mut f = Filter::init(&cfg(&[])).unwrap();
        assert_eq!(f.process(&batch()).unwrap(), TransformResult::KeepAll);
        let mut f = Filter::init(&cfg(&[("exclude_tables", "[\"public.audit_*\"]")])).unwrap();
        assert_eq!(
            f.process(&batch()).unwrap(),
            TransformResult::Keep(vec![0, 1, 3])
        );
        let mut f = Filter::init(&cfg(&[("include_tables", "public.audit_log")])).unwrap();
        assert_eq!(f.process(&batch()).unwrap(), TransformResult::Keep(vec![2]));
    }

    #[test]
    fn predicates() {
        let keep = |w: &str| match Filter::init(&cfg(&[("where", w)])).unwrap().apply(&batch()) {
            TransformResult::Keep(k) => k,
            TransformResult::KeepAll => vec![0, 1, 2, 3],
            r => panic!("{r:?}"),
        };
        assert_eq!(keep("status = 'paid'"), vec![0, 2, 3]);
        assert_eq!(keep("status != 'paid'"), vec![1, 2]);
        assert_eq!(keep("amount > 10 and status = 'paid'"), vec![0, 2, 3]);
        assert_eq!(keep("amount < 10"), vec![1, 2]);
        assert_eq!(keep("id in (1, 2)"), vec![0, 1]);
        assert_eq!(keep("email is null"), vec![1, 2, 3]);
        assert_eq!(keep("email is not null"), vec![0, 2]);
        assert!(Filter::init(&cfg(&[("where", "amount ~ 3")])).is_err());
        assert!(Filter::init(&cfg(&[("wher", "x")]))
            .unwrap_err()
            .contains("unknown config key"));
    }

    #[test]
    fn encoded_path_agrees_with_typed() {
        let enc = dbmazz_sdk::encoded::encode_for_tests(&batch());
        for w in [
            "status = 'paid'",
            "amount > 10 and status = 'paid'",
            "id in (1, 2)",
            "email is null",
            "amount < 10",
        ] {
            let f =
                Filter::init(&cfg(&[("where", w), ("exclude_tables", "public.audit_*")])).unwrap();
            assert!(f.prefers_encoded());
            assert_eq!(f.apply_encoded(&enc).unwrap(), f.apply(&batch()), "{w}");
        }
    }

    #[test]
    fn drop_and_mask() {
        let f = Filter::init(&cfg(&[
            ("drop_columns", "amount"),
            ("mask_columns", "public.orders.email"),
            ("mask", "sha256"),
        ]))
        .unwrap();
        let TransformResult::Replace((rels, changes)) = f.apply(&batch()) else {
            panic!()
        };
        assert_eq!(
            rels[0]
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["id", "status", "email"]
        );
        assert_eq!(changes.len(), 4);
        let new = changes[0].new.as_ref().unwrap();
        assert_eq!(new[1], Datum::Text("paid".into()));
        let expected: String = Sha256::digest(b"a@b.c")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(expected.len(), 64);
        assert_eq!(new[2], Datum::Text(expected));
        assert_eq!(
            changes[1].new.as_ref().unwrap()[2],
            Datum::Null,
            "NULL stays NULL when masked"
        );
        assert_eq!(
            changes[3].old.as_ref().unwrap().len(),
            3,
            "old rows are reshaped too"
        );
        let f = Filter::init(&cfg(&[("mask_columns", "email")])).unwrap();
        let TransformResult::Replace((_, changes)) = f.apply(&batch()) else {
            panic!()
        };
        assert_eq!(
            changes[0].new.as_ref().unwrap()[3],
            Datum::Text("***".into())
        );
    }
}
