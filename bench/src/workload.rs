//! The workloads: their tables, the SQL that generates their WAL, and how many row
//! changes each produces.

/// The 8 columns of W1, W2 and W4: bigint key, int, numeric, text (~40 B), timestamptz,
/// bool, small jsonb, text (~200 B).
pub const COLUMNS: &str =
    "id bigint PRIMARY KEY, n int NOT NULL, amount numeric(12,2), label text, \
                       at timestamptz, flag bool, doc jsonb, body text";

/// The target table of `table` (a workload's) in StarRocks, for sink-starrocks: (column,
/// DDL type), key `id`; the sink adds its audit columns itself.
pub fn starrocks_columns(table: &str) -> Vec<(&'static str, &'static str)> {
    if table == "w3" {
        return vec![("id", "BIGINT"), ("n", "INT"), ("body", "STRING")];
    }
    vec![
        ("id", "BIGINT"),
        ("n", "INT"),
        ("amount", "DECIMAL(12,2)"),
        ("label", "STRING"),
        ("at", "DATETIME"),
        ("flag", "BOOLEAN"),
        ("doc", "JSON"),
        ("body", "STRING"),
    ]
}

/// One row of [`COLUMNS`] from `g` (a bigint expression).
pub fn row(g: &str) -> String {
    format!(
        "{g}, ({g} % 1000)::int, ({g} % 100000) / 100.0, md5({g}::text) || 'abcdefgh', \
         timestamptz '2026-01-01 00:00:00+00' + {g} * interval '1 second', {g} % 2 = 0, \
         jsonb_build_object('k', {g}, 'tag', 'bench'), repeat(md5({g}::text), 6) || 'abcdefgh'"
    )
}

/// Sizes: the (full) or a hundredth-ish for `--quick`.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// W1 rows and rows per transaction.
    pub w1_rows: u64,
    pub w1_txn: u64,
    /// W2 transactions (5 changes each).
    pub w2_txns: u64,
    /// W3 rows (4 kB TOAST each), updates, updates per transaction.
    pub w3_rows: u64,
    pub w3_updates: u64,
    pub w3_txn: u64,
    /// W4 rows in one transaction.
    pub w4_rows: u64,
}

impl Scale {
    /// The sizes the benchmark issue names.
    pub const FULL: Scale = Scale {
        w1_rows: 1_000_000,
        w1_txn: 10_000,
        w2_txns: 100_000,
        w3_rows: 10_000,
        w3_updates: 100_000,
        w3_txn: 1_000,
        w4_rows: 2_000_000,
    };
    /// A smoke test of every path.
    pub const QUICK: Scale = Scale {
        w1_rows: 20_000,
        w1_txn: 1_000,
        w2_txns: 1_000,
        w3_rows: 200,
        w3_updates: 2_000,
        w3_txn: 100,
        w4_rows: 50_000,
    };
}

/// One catch-up workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `W1` … `W4`.
    pub name: &'static str,
    /// One line for the report.
    pub description: String,
    /// Its table (in `public`).
    pub table: &'static str,
    /// Run before the slots exist (not streamed).
    pub setup: Vec<String>,
    /// Run after the slots exist; each statement is its own transaction (or a procedure
    /// committing inside).
    pub generate: Vec<String>,
    /// Row changes the generation commits.
    pub changes: u64,
}

/// W1–W4 at `scale`.
pub fn all(scale: Scale) -> Vec<Workload> {
    let w1 = Workload {
        name: "W1",
        description: format!(
            "bulk: {} inserts of 8-column rows in transactions of {}",
            scale.w1_rows, scale.w1_txn
        ),
        table: "w1",
        setup: vec![format!("CREATE TABLE w1 ({COLUMNS})")],
        generate: (0..scale.w1_rows.div_ceil(scale.w1_txn))
            .map(|i| {
                let lo = i * scale.w1_txn + 1;
                let hi = ((i + 1) * scale.w1_txn).min(scale.w1_rows);
                format!(
                    "INSERT INTO w1 SELECT {} FROM generate_series({lo}::bigint, {hi}) g",
                    row("g")
                )
            })
            .collect(),
        changes: scale.w1_rows,
    };
    // Transaction i inserts ids 3i..3i+2, updates 3i-3 and deletes 3i-2 (rows of the
    // previous transaction; the first one touches the seeds -3 and -2).
    let w2 = Workload {
        name: "W2",
        description: format!(
            "OLTP: {} transactions of 3 inserts, 1 update, 1 delete",
            scale.w2_txns
        ),
        table: "w2",
        setup: vec![
            format!("CREATE TABLE w2 ({COLUMNS})"),
            format!(
                "INSERT INTO w2 SELECT {} FROM generate_series(-3::bigint, -1) g",
                row("g")
            ),
            format!(
                "CREATE PROCEDURE w2_generate(txns bigint) LANGUAGE plpgsql AS $$
                 DECLARE b bigint;
                 BEGIN
                   FOR i IN 0..txns - 1 LOOP
                     b := i * 3;
                     INSERT INTO w2 SELECT {} FROM generate_series(b, b + 2) g;
                     UPDATE w2 SET n = n + 1, flag = NOT flag WHERE id = b - 3;
                     DELETE FROM w2 WHERE id = b - 2;
                     COMMIT;
                   END LOOP;
                 END $$",
                row("g")
            ),
        ],
        generate: vec![format!("CALL w2_generate({})", scale.w2_txns)],
        changes: scale.w2_txns * 5,
    };
    let w3 = Workload {
        name: "W3",
        description: format!(
            "wide TOAST: {} updates (in transactions of {}) of {} rows with an unchanged 4 kB text",
            scale.w3_updates, scale.w3_txn, scale.w3_rows
        ),
        table: "w3",
        setup: vec![
            "CREATE TABLE w3 (id bigint PRIMARY KEY, n int NOT NULL, body text)".into(),
            // EXTERNAL: stored out of line, uncompressed (a TOAST pointer in the row).
            "ALTER TABLE w3 ALTER COLUMN body SET STORAGE EXTERNAL".into(),
            format!(
                "INSERT INTO w3 SELECT g, 0, repeat(md5(g::text), 128) FROM generate_series(1::bigint, {}) g",
                scale.w3_rows
            ),
        ],
        generate: (0..scale.w3_updates.div_ceil(scale.w3_txn))
            .map(|i| {
                let lo = (i * scale.w3_txn) % scale.w3_rows + 1;
                let hi = lo + scale.w3_txn - 1;
                format!("UPDATE w3 SET n = n + 1 WHERE id BETWEEN {lo} AND {hi}")
            })
            .collect(),
        changes: scale.w3_updates,
    };
    let w4 = Workload {
        name: "W4",
        description: format!(
            "one huge transaction: {} inserts (streamed by the server)",
            scale.w4_rows
        ),
        table: "w4",
        setup: vec![format!("CREATE TABLE w4 ({COLUMNS})")],
        generate: vec![format!(
            "INSERT INTO w4 SELECT {} FROM generate_series(1::bigint, {}) g",
            row("g"),
            scale.w4_rows
        )],
        changes: scale.w4_rows,
    };
    vec![w1, w2, w3, w4]
}

/// The steady-state table (W2's shape) and one transaction of connection `conn`, number
/// `i`: 3 inserts, 1 update, 1 delete (seeds: [`steady_seed`]).
pub fn steady_table() -> String {
    format!("CREATE TABLE steady ({COLUMNS})")
}

fn steady_base(conn: u64) -> i64 {
    (conn as i64 + 1) * 1_000_000_000_000
}

/// Seed rows for connection `conn` (ids base-3..base-1), inserted before the slot.
pub fn steady_seed(conn: u64) -> String {
    let b = steady_base(conn);
    format!(
        "INSERT INTO steady SELECT {} FROM generate_series({}::bigint, {}) g",
        row("g"),
        b - 3,
        b - 1
    )
}

/// A function committing one steady-state transaction's changes for base id `b`: 3
/// inserts, an update of `b - 3` and a delete of `b - 2` (PL/pgSQL caches its plans, so
/// the generator costs the server little CPU next to dbmazz and the walsender).
pub fn steady_function() -> String {
    format!(
        "CREATE FUNCTION steady_txn(b bigint) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO steady SELECT {} FROM generate_series(b, b + 2) g;
           UPDATE steady SET n = n + 1, flag = NOT flag WHERE id = b - 3;
           DELETE FROM steady WHERE id = b - 2;
         END $$",
        row("g")
    )
}

/// The base id of transaction `i` of connection `conn` (for [`steady_function`]).
pub fn steady_txn_base(conn: u64, i: u64) -> i64 {
    steady_base(conn) + 3 * i as i64
}
