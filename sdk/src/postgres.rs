//! PostgreSQL connections the operator granted to a sink
//! (`capabilities = { postgres = ["analytics"] }`, with `[connections.analytics] url =
//! "..."` in the host config). The plugin names the connection; the host holds the URL,
//! the credentials and the TLS settings, and no error shows them.
//!
//! ```no_run
//! use dbmazz_sdk::postgres::{Connection, PgValue};
//!
//! # fn f() -> Result<(), dbmazz_sdk::postgres::PgError> {
//! let db = Connection::open("analytics")?;
//! db.begin()?;
//! db.execute("INSERT INTO t (id, at) VALUES ($1, $2)", &[PgValue::Int(1), PgValue::Text("2024-01-02 03:04:05+00".into())])?;
//! db.copy_in("COPY t (id, at) FROM STDIN", b"2\t2024-01-03 00:00:00+00\n")?;
//! db.commit()?;
//! let rows = db.query("SELECT count(*)::int8 FROM t", &[])?;
//! # Ok(()) }
//! ```
//!
//! Values: [`PgValue::Text`] passes any type in PostgreSQL's text form (the server parses
//! it like a literal); the other variants must match the parameter's type. Query results
//! of types other than bool, integers, floats, text-like types, json(b) and bytea are an
//! error naming the column: cast them (`col::text`).
//!
//! Errors carry an [`ErrorKind`] (from the SQLSTATE) so a sink can act on it: `Connection`
//! and `Serialization` are transient (retry), `Constraint` and `Data` are a row's fault
//! (dead-letter it), `Permission` needs a GRANT (fatal), `Denied` means the stage has no
//! grant for the name.
//!
//! Natively (`cargo test`) there is no host: [`Connection::open`] returns a `Denied`
//! error. Test a PostgreSQL sink in a real pipeline (`dbmazz run` against two databases).

pub use crate::bindings::sink::dbmazz::plugin::postgres::{ErrorKind, PgError, PgValue, RowSet};

/// One connection from the host's pool for a granted name. Statements run on it in
/// order; a transaction (`begin` ... `commit`) spans calls. Dropping it inside a
/// transaction rolls the transaction back.
pub struct Connection {
    #[cfg(target_arch = "wasm32")]
    inner: crate::bindings::sink::dbmazz::plugin::postgres::Connection,
}

#[cfg(not(target_arch = "wasm32"))]
fn native() -> PgError {
    PgError {
        kind: ErrorKind::Denied,
        code: String::new(),
        message: "no PostgreSQL connections outside a component: run the plugin in dbmazz".into(),
        detail: None,
        hint: None,
    }
}

macro_rules! call {
    ($self:ident, $method:ident $(, $arg:expr)*) => {{
        #[cfg(target_arch = "wasm32")]
        return $self.inner.$method($($arg),*);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = ($self, $($arg),*);
            return Err(native());
        }
    }};
}

impl Connection {
    /// Opens the connection the operator named `name`.
    ///
    /// # Errors
    /// `Denied` (the stage has no grant for `name`), `Connection` (the host cannot reach
    /// the database; its log says why).
    pub fn open(name: &str) -> Result<Connection, PgError> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::sink::dbmazz::plugin::postgres::Connection::open(name)
            .map(|inner| Connection { inner });
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = name;
            Err(native())
        }
    }

    /// Runs one statement with parameters `$1`, `$2`, ...; returns the rows it affected.
    ///
    /// # Errors
    /// The server's error, classified ([`ErrorKind`]).
    pub fn execute(&self, statement: &str, params: &[PgValue]) -> Result<u64, PgError> {
        call!(self, execute, statement, params)
    }

    /// Runs one query with parameters; returns its column names and rows.
    ///
    /// # Errors
    /// The server's error; a result column of a type without a [`PgValue`] variant.
    pub fn query(&self, statement: &str, params: &[PgValue]) -> Result<RowSet, PgError> {
        call!(self, query, statement, params)
    }

    /// Runs statements separated by `;`, without parameters, in one round trip.
    ///
    /// # Errors
    /// The first statement's error (the rest do not run).
    pub fn batch_execute(&self, statements: &str) -> Result<(), PgError> {
        call!(self, batch_execute, statements)
    }

    /// Runs `COPY ... FROM STDIN` with `data` in the statement's format (text by
    /// default: tab-separated, `\N` for NULL, backslash escapes; see [`copy_text`]);
    /// returns the rows copied.
    ///
    /// # Errors
    /// The server's error (a row that does not parse is `Data`).
    pub fn copy_in(&self, statement: &str, data: &[u8]) -> Result<u64, PgError> {
        call!(self, copy_in, statement, data)
    }

    /// `BEGIN`.
    ///
    /// # Errors
    /// The server's error.
    pub fn begin(&self) -> Result<(), PgError> {
        call!(self, begin)
    }

    /// `COMMIT`.
    ///
    /// # Errors
    /// The server's error (a failed commit rolled the transaction back).
    pub fn commit(&self) -> Result<(), PgError> {
        call!(self, commit)
    }

    /// `ROLLBACK`.
    ///
    /// # Errors
    /// The server's error.
    pub fn rollback(&self) -> Result<(), PgError> {
        call!(self, rollback)
    }
}

impl PgError {
    /// True for failures that go away by themselves: a lost connection, a serialization
    /// failure or deadlock.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Connection | ErrorKind::Serialization)
    }

    /// True when a row is at fault (a constraint, a value the column cannot take).
    pub fn is_row_fault(&self) -> bool {
        matches!(self.kind, ErrorKind::Constraint | ErrorKind::Data)
    }

    /// `message (SQLSTATE code): detail; hint`, for logs and sink errors.
    pub fn describe(&self) -> String {
        let mut s = self.message.clone();
        if !self.code.is_empty() {
            s.push_str(&format!(" (SQLSTATE {})", self.code));
        }
        if let Some(d) = &self.detail {
            s.push_str(&format!(": {d}"));
        }
        if let Some(h) = &self.hint {
            s.push_str(&format!("; hint: {h}"));
        }
        s
    }
}

/// Helpers for COPY's text format (PostgreSQL docs, "COPY", "Text Format").
pub mod copy_text {
    /// Appends `value` to `out` escaped for a COPY text field: backslash, newline,
    /// carriage return and tab become `\\`, `\n`, `\r`, `\t`.
    pub fn push_escaped(out: &mut Vec<u8>, value: &[u8]) {
        out.reserve(value.len());
        let mut start = 0;
        let mut i = 0;
        while i < value.len() {
            // eight bytes at a time while none of them needs escaping (most text)
            if let Some(word) = value.get(i..i + 8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(word);
                if !may_need_escape(u64::from_le_bytes(w)) {
                    i += 8;
                    continue;
                }
            }
            let esc = match value[i] {
                b'\\' => b'\\',
                b'\n' => b'n',
                b'\r' => b'r',
                b'\t' => b't',
                _ => {
                    i += 1;
                    continue;
                }
            };
            out.extend_from_slice(&value[start..i]);
            out.push(b'\\');
            out.push(esc);
            i += 1;
            start = i;
        }
        out.extend_from_slice(&value[start..]);
    }

    /// True when a byte of `w` is a backslash or below 0x0E (where tab, newline and
    /// carriage return are): the "determine if a word has a byte less than n" and "has a
    /// zero byte" tests of Bit Twiddling Hacks (S. E. Anderson). A word holding 0x00-0x08
    /// or 0x0B-0x0C also says true (the byte loop then finds nothing to escape).
    #[inline]
    fn may_need_escape(w: u64) -> bool {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        let below_0e = w.wrapping_sub(ONES * 0x0E) & !w & HIGHS;
        let x = w ^ (ONES * u64::from(b'\\'));
        let backslash = x.wrapping_sub(ONES) & !x & HIGHS;
        below_0e | backslash != 0
    }

    /// A NULL field: `\N`.
    pub const NULL: &[u8] = b"\\N";

    #[cfg(test)]
    mod tests {
        #[test]
        fn escapes_what_copy_text_reads_specially() {
            let mut out = Vec::new();
            super::push_escaped(&mut out, b"a\\b\tc\nd\re");
            assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
            let mut plain = Vec::new();
            super::push_escaped(&mut plain, b"plain");
            assert_eq!(plain, b"plain");
        }

        #[test]
        fn escapes_at_every_position_of_the_word_scan() {
            // every special byte at every offset of a 19-byte value, next to bytes
            // that are close to them (0x08, 0x0E, 0x5B, 0x5D, UTF-8 continuation bytes)
            for special in [b'\\', b'\n', b'\r', b'\t'] {
                for at in 0..19 {
                    let mut value: Vec<u8> = b"\x08\x0e[]\xc3\xa9abcdefghijklm".to_vec();
                    value[at] = special;
                    let mut expected = Vec::new();
                    for &b in &value {
                        match b {
                            b'\\' => expected.extend_from_slice(b"\\\\"),
                            b'\n' => expected.extend_from_slice(b"\\n"),
                            b'\r' => expected.extend_from_slice(b"\\r"),
                            b'\t' => expected.extend_from_slice(b"\\t"),
                            _ => expected.push(b),
                        }
                    }
                    let mut out = Vec::new();
                    super::push_escaped(&mut out, &value);
                    assert_eq!(out, expected, "{special:#x} at {at}");
                }
            }
        }
    }
}

/// A quoted SQL identifier: `"name"` with inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal: `'text'` with inner quotes doubled (for statements that
/// take no parameters, such as COPY and DDL).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
