/**
 * A test double of the host for unit tests under Node (`node --test`): batches built in the
 * shapes the component receives, a typed config, recorded log events, and `fetch`
 * answered by your handler with every request recorded. No wasm, no host, no database.
 *
 *     import { BatchBuilder, config, onHttp, requests, reset } from '@dbmazz/sdk/testing';
 *
 *     onHttp((req) => new Response('', { status: 200 }));
 *     await new MySink(config({ url: 'http://receiver/in' })).write(
 *       new BatchBuilder(42).table(1, 'public', 'orders', [['id', 23, true]]).insert(1, [1]).build());
 *     requests()[0].body;   // what was POSTed, as text
 */

import { Config, UNCHANGED_TOAST } from './index.js';
import { recordedLogs } from './host-node.js';

/** A JavaScript value as the `datum` the host would send: null, UNCHANGED_TOAST, boolean,
 * an integer number or BigInt (int), another number (float), a string (text), a
 * Uint8Array (bytes), anything else as json. Pass `{ tag, val }` for numeric or other exact
 * shapes. */
export function datum(v) {
  if (v === null || v === undefined) return { tag: 'null' };
  if (v === UNCHANGED_TOAST) return { tag: 'unchanged-toast' };
  if (typeof v === 'boolean') return { tag: 'boolean', val: v };
  if (typeof v === 'bigint') return { tag: 'int', val: v };
  if (typeof v === 'number') return Number.isInteger(v) ? { tag: 'int', val: BigInt(v) } : { tag: 'float', val: v };
  if (typeof v === 'string') return { tag: 'text', val: v };
  if (v instanceof Uint8Array) return { tag: 'bytes', val: v };
  if (typeof v === 'object' && typeof v.tag === 'string') return v;
  return { tag: 'json', val: JSON.stringify(v) };
}

/** Builds a batch (`{ id, firstLsn, lastLsn, relations, changes }`) as the host sends it;
 * LSNs start at 0/1000 and rise by 8 per change. */
export class BatchBuilder {
  constructor(id = 1) {
    this.id = BigInt(id);
    this.relations = [];
    this.changes = [];
    this.lsn = 0x1000n;
  }

  /** A relation: `columns` as `[[name, typeOid, key], ...]` (23 int4, 25 text, 3802
   * jsonb, 17 bytea, 1700 numeric, ...). */
  table(id, schema, table, columns) {
    this.relations.push({
      id,
      schema,
      table,
      columns: columns.map(([name, typeOid, key]) => ({ name, typeOid, typeModifier: -1, key: Boolean(key) })),
    });
    return this;
  }

  /** Any change; `old`/`new` as arrays of values in column order (see {@link datum}). */
  change(op, relation, { old, new: new_, xid = 700, oldIsKey = false } = {}) {
    this.lsn += 8n;
    this.changes.push({
      op,
      relation,
      lsn: this.lsn,
      commitLsn: this.lsn,
      xid,
      commitTimeUs: 1_700_000_000_000_000n,
      old: old === undefined ? undefined : old.map(datum),
      oldIsKey,
      new: new_ === undefined ? undefined : new_.map(datum),
    });
    return this;
  }

  insert(relation, values) {
    return this.change('insert', relation, { new: values });
  }

  update(relation, values, old = undefined) {
    return this.change('update', relation, { new: values, old });
  }

  delete(relation, old) {
    return this.change('delete', relation, { old, oldIsKey: true });
  }

  read(relation, values) {
    return this.change('read', relation, { new: values });
  }

  build() {
    const lsns = this.changes.map((c) => c.lsn);
    return {
      id: this.id,
      firstLsn: lsns[0] ?? 0n,
      lastLsn: lsns[lsns.length - 1] ?? 0n,
      relations: this.relations,
      changes: this.changes,
    };
  }
}

const OP_BYTES = { insert: 0x49, update: 0x55, delete: 0x44, truncate: 0x54, read: 0x52 };

function datumText(d) {
  switch (d.tag) {
    case 'boolean':
      return d.val ? 't' : 'f';
    case 'bytes':
      return '\\x' + Array.from(d.val, (b) => b.toString(16).padStart(2, '0')).join('');
    default: // int (BigInt), float (PostgreSQL prints NaN / Infinity / -Infinity alike), text, numeric, json
      return String(d.val);
  }
}

/**
 * A typed batch (from {@link BatchBuilder}) in the compact encoding, as the host sends it
 * to a plugin with `static prefersEncoded = true`: `{ id, firstLsn, lastLsn, relations,
 * count, data }`, values in PostgreSQL's text form. Test a plugin's encoded path with it.
 */
export function encode(batch) {
  const bytes = [];
  const u = (n, width) => {
    for (let i = width - 1; i >= 0; i--) bytes.push(Number((BigInt(n) >> BigInt(8 * i)) & 0xffn));
  };
  const utf8 = new TextEncoder();
  const tuple = (values) => {
    u(values.length, 2);
    for (const d of values) {
      if (d.tag === 'null') bytes.push(0x6e);
      else if (d.tag === 'unchanged-toast') bytes.push(0x75);
      else {
        const t = utf8.encode(datumText(d));
        bytes.push(0x74);
        u(t.length, 4);
        bytes.push(...t);
      }
    }
  };
  for (const c of batch.changes) {
    bytes.push(OP_BYTES[c.op]);
    u(c.relation, 4);
    u(c.lsn, 8);
    u(c.commitLsn, 8);
    u(c.xid, 4);
    u(BigInt.asUintN(64, c.commitTimeUs), 8);
    bytes.push((c.old ? 1 : 0) | (c.oldIsKey ? 2 : 0) | (c.new ? 4 : 0));
    if (c.old) tuple(c.old);
    if (c.new) tuple(c.new);
  }
  return {
    id: batch.id,
    firstLsn: batch.firstLsn,
    lastLsn: batch.lastLsn,
    relations: batch.relations,
    count: batch.changes.length,
    data: Uint8Array.from(bytes),
  };
}

/** A {@link Config} as `init` would give it: `config({ url: 'http://r/', batch: 100 })`. */
export function config(values = {}) {
  return new Config(values);
}

const recordedRequests = [];
let handler = () => new Response('', { status: 200 });
let realFetch;

/**
 * Answers `fetch` with `fn(request)` (a `Response`, or a promise of one) from now until
 * {@link reset}; every request is recorded as `{ method, url, headers: {lowercase name:
 * value}, body: text }` ({@link requests}).
 */
export function onHttp(fn) {
  handler = fn;
  if (!realFetch) {
    realFetch = globalThis.fetch;
    globalThis.fetch = async (input, init = {}) => {
      const req = new Request(input, init);
      const recorded = {
        method: req.method,
        url: req.url,
        headers: Object.fromEntries(req.headers),
        body: await req.text(),
      };
      recordedRequests.push(recorded);
      return handler(recorded);
    };
  }
}

/** The requests made through `fetch` since the last {@link reset}. */
export function requests() {
  return [...recordedRequests];
}

/** The log events written through `log` since the last {@link reset}: `{ level, message,
 * fields }`. */
export function logs() {
  return [...recordedLogs];
}

/** Forgets requests and logs and gives `fetch` back. */
export function reset() {
  recordedRequests.length = 0;
  recordedLogs.length = 0;
  handler = () => new Response('', { status: 200 });
  if (realFetch) {
    globalThis.fetch = realFetch;
    realFetch = undefined;
  }
}
