/**
 * Reading the compact batch encoding (`encoded-batch` in `wit/dbmazz-plugin.wit`): the
 * changes of a batch in one byte buffer, each change's values as PostgreSQL's own
 * TupleData (PostgreSQL docs, "Logical Replication Message Formats"). A batch crosses
 * into the component as one `Uint8Array` instead of an object per value; this module
 * walks it without copying, and `changes()` in `index.js` turns what it finds into the
 * same {@link ChangeView}s as a typed batch.
 *
 * Layout of `data` (`count` changes, integers big-endian):
 *
 *     op u8 ('I' insert, 'U' update, 'D' delete, 'T' truncate, 'R' read)
 *     relation u32 | lsn u64 | commit-lsn u64 | xid u32 | commit-time-us i64
 *     flags u8: bit 0 old present, bit 1 old is key only, bit 2 new present
 *     [old tuple] [new tuple]
 *
 * tuple: `ncols u16`, then per column `'n'` (null), `'u'` (unchanged TOAST), or `'t'`
 * (text) / `'b'` (binary) followed by `len u32` and the value's bytes.
 */

/** A malformed buffer (a host bug, never expected): `offset` is the byte in `data`. */
export class DecodeError extends Error {
  constructor(offset, what) {
    super(`malformed encoded batch at byte ${offset}: ${what}`);
    this.name = 'DecodeError';
    this.offset = offset;
  }
}

const OPS = { 0x49: 'insert', 0x55: 'update', 0x44: 'delete', 0x54: 'truncate', 0x52: 'read' };

/** Column value kinds in a tuple. */
export const NULL = 0x6e; // 'n'
export const UNCHANGED = 0x75; // 'u'
export const TEXT = 0x74; // 't'
export const BINARY = 0x62; // 'b'

/** True when `batch` is an `encoded-batch` (what a plugin that prefers the compact
 * encoding receives) rather than a typed `batch`. */
export function isEncoded(batch) {
  return batch.changes === undefined && batch.data !== undefined && batch.data !== null;
}

/** A cursor over one buffer. */
export class Reader {
  constructor(data) {
    // a Uint8Array (inside the component, of another realm: `instanceof` says false)
    const bytes = ArrayBuffer.isView(data)
      ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
      : Uint8Array.from(data);
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  need(at, n, what = 'truncated') {
    if (at + n > this.bytes.length) throw new DecodeError(at, what);
  }

  /**
   * The change at `at`: `{ op, relation, lsn, commitLsn, xid, commitTimeUs, oldIsKey,
   * oldAt, newAt, end }` — LSNs and the time as BigInt, `oldAt`/`newAt` the offsets of
   * the tuples (-1 when absent), `end` where the next change starts.
   */
  change(at) {
    this.need(at, 34);
    const v = this.view;
    const op = OPS[this.bytes[at]];
    if (op === undefined) throw new DecodeError(at, 'unknown op');
    const flags = this.bytes[at + 33];
    let next = at + 34;
    let oldAt = -1;
    let newAt = -1;
    if (flags & 1) {
      oldAt = next;
      next = this.skipTuple(next);
    }
    if (flags & 4) {
      newAt = next;
      next = this.skipTuple(next);
    }
    return {
      op,
      relation: v.getUint32(at + 1),
      lsn: v.getBigUint64(at + 5),
      commitLsn: v.getBigUint64(at + 13),
      xid: v.getUint32(at + 21),
      commitTimeUs: v.getBigInt64(at + 25),
      oldIsKey: (flags & 2) !== 0,
      oldAt,
      newAt,
      end: next,
    };
  }

  /** Where the tuple at `at` ends (checking every length). */
  skipTuple(at) {
    this.need(at, 2);
    const n = this.view.getUint16(at);
    let p = at + 2;
    for (let i = 0; i < n; i++) {
      this.need(p, 1);
      const kind = this.bytes[p++];
      if (kind === TEXT || kind === BINARY) {
        this.need(p, 4);
        const len = this.view.getUint32(p);
        p += 4;
        this.need(p, len, 'value past the end');
        p += len;
      } else if (kind !== NULL && kind !== UNCHANGED) {
        throw new DecodeError(p - 1, 'unknown value kind');
      }
    }
    return p;
  }

  /** Calls `visit(column, kind, start, end)` for each value of the tuple at `at` (a tuple
   * `change()` already checked). */
  eachValue(at, visit) {
    const n = this.view.getUint16(at);
    let p = at + 2;
    for (let i = 0; i < n; i++) {
      const kind = this.bytes[p++];
      if (kind === TEXT || kind === BINARY) {
        const len = this.view.getUint32(p);
        p += 4;
        visit(i, kind, p, p + len);
        p += len;
      } else {
        visit(i, kind, p, p);
      }
    }
  }

  /** The UTF-8 text in `[start, end)`. */
  text(start, end) {
    // The buffer as one string of one char per byte, decoded once by native code:
    // an ASCII value (most are) is then a substring, no per-byte work in JavaScript.
    if (this.chars === undefined) this.chars = latin1(this.bytes);
    const s = this.chars.substring(start, end);
    return NON_ASCII.test(s) ? this.utf8(start, end) : s;
  }

  utf8(start, end) {
    try {
      return decoder().decode(this.bytes.subarray(start, end));
    } catch {
      throw new DecodeError(start, 'text value is not UTF-8');
    }
  }
}

const NON_ASCII = /[^\x00-\x7f]/;

/** Bytes → a string with one char per byte (ASCII bytes as themselves). */
function latin1(bytes) {
  try {
    return new TextDecoder('latin1').decode(bytes);
  } catch {
    // an engine without the legacy single-byte decoders
    let s = '';
    for (let i = 0; i < bytes.length; i += 8192) {
      s += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
    }
    return s;
  }
}

let utf8;
function decoder() {
  if (!utf8) utf8 = new TextDecoder('utf-8', { fatal: true });
  return utf8;
}
