/**
 * @dbmazz/sdk for JavaScript: write dbmazz sinks and transforms as WebAssembly components.
 *
 * A sink is a class with `write(batch)` (may be `async`: `fetch` works inside the
 * component); a transform one with `process(batch)`. The same class runs under Node in
 * your tests (`@dbmazz/sdk/testing`, `node --test`) and inside the component that
 * `dbmazz-plugin-build` makes with ComponentizeJS:
 *
 *     import { Sink, exportSink, changes, log } from '@dbmazz/sdk';
 *
 *     class Printer extends Sink {
 *       static metadata = { name: 'printer', config: [key('prefix', 'text', { doc: 'log prefix' })] };
 *       write(batch) {
 *         for (const c of changes(batch)) log.info(`${c.op} ${c.table}`, { id: c.new?.id });
 *       }
 *     }
 *     export const sinkPlugin = exportSink(Printer);   // the component's export
 *
 * Shapes (contract `dbmazz:plugin@0.3.0`, `wit/dbmazz-plugin.wit`, as ComponentizeJS
 * lifts them: record fields in camelCase, u64/s64 as BigInt, variants as `{ tag, val }`):
 * a batch is `{ id, firstLsn, lastLsn, relations, changes }` (`id` is stable across
 * replays: an idempotency key); `changes(batch)` gives each change as a {@link ChangeView}
 * with the op name (`insert`, `update`, `delete`, `truncate`, `read`), `schema.table`, and
 * `old`/`new` as objects by column name with JavaScript values ({@link value}).
 *
 * Errors: throw {@link Retryable} (the host retries the batch with backoff), {@link Fatal}
 * (the pipeline stops) or {@link DeadLetter} (these changes go to the dead-letter store,
 * the rest counts as written). Anything else thrown is retryable, with its stack in the
 * error the host logs and shows in Status.
 */

import { logWrite } from '#host';
import { BINARY, NULL, Reader, TEXT, UNCHANGED, isEncoded } from './encoded.js';

export { DecodeError, isEncoded } from './encoded.js';

/** The contract this SDK builds against. */
export const CONTRACT = '0.3.0';

/** The value of a column whose TOASTed value the update did not send: the stored value
 * stays. Never a NULL. */
export const UNCHANGED_TOAST = Object.freeze({
  toString() {
    return 'UNCHANGED_TOAST';
  },
});

/** A transient failure: the host retries the whole batch, after `retryAfterMs` (ms) when
 * given. */
export class Retryable extends Error {
  constructor(message, retryAfterMs = undefined) {
    super(message);
    this.name = 'Retryable';
    this.retryAfterMs = retryAfterMs;
  }
}

/** The sink cannot work (bad credentials, a missing table): the pipeline stops. */
export class Fatal extends Error {
  constructor(message) {
    super(message);
    this.name = 'Fatal';
  }
}

/** The batch was written except these changes: `[[index, reason], ...]`, indices into
 * `batch.changes`. */
export class DeadLetter extends Error {
  constructor(rejected) {
    super(`${rejected.length} changes rejected`);
    this.name = 'DeadLetter';
    this.rejected = rejected.map(([index, reason]) => [index, String(reason)]);
  }
}

/** The types a configuration key may declare (`metadata.config-type`). */
export const CONFIG_TYPES = ['text', 'integer', 'float', 'boolean', 'array', 'table', 'any'];

/**
 * A configuration key the plugin takes; the host refuses other keys, wrong types and
 * missing required keys before `init`, with a message naming them.
 *
 * @param {string} name
 * @param {string} type one of {@link CONFIG_TYPES}
 * @param {{required?: boolean, default?: string, doc?: string}} [options]
 */
export function key(name, type = 'text', { required = false, default: def, doc = '' } = {}) {
  if (!CONFIG_TYPES.includes(type)) {
    throw new TypeError(`key ${name}: type ${type} is not one of ${CONFIG_TYPES.join(', ')}`);
  }
  return { name, type, required, default: def === undefined ? undefined : String(def), doc };
}

/** The stage's `config` table (then the host's `dbmazz.*` keys), typed: strings, numbers
 * (BigInt for an integer beyond 2^53), booleans, and arrays/objects for TOML arrays and
 * tables. */
export class Config {
  constructor(values = {}) {
    this.values = { ...values };
  }

  /** The value of `name`, or `fallback` when the key is absent. */
  get(name, fallback = undefined) {
    return Object.hasOwn(this.values, name) ? this.values[name] : fallback;
  }

  /** The value of `name`; throws {@link Fatal} when it is absent. */
  required(name) {
    if (!Object.hasOwn(this.values, name)) throw new Fatal(`config key ${name} is required`);
    return this.values[name];
  }

  has(name) {
    return Object.hasOwn(this.values, name);
  }
}

class Plugin {
  /**
   * What `dbmazz plugin inspect` shows and `dbmazz check` validates: `{ name, version,
   * description, config: [key(...)], memoryMb }`. `config` empty or absent: any key is
   * passed through unchecked. `memoryMb`: linear memory the plugin needs (MiB); the host
   * refuses a stage whose `limits.memory_mb` is lower.
   */
  static metadata = {};

  constructor(config) {
    this.config = config;
  }
}

/** Extend and implement `write(batch)` (sync or async). */
export class Sink extends Plugin {
  /** True: the host sends batches in the compact encoding (`encoded-batch`: one byte
   * buffer instead of an object per value, so crossing into the component is one copy);
   * {@link changes} and {@link toJson} read both forms the same way, so the plugin's code
   * does not change. Such a batch has `count` and `data` instead of `changes`. */
  static prefersEncoded = false;

  // eslint-disable-next-line no-unused-vars
  write(batch) {
    throw new Fatal(`${this.constructor.name} does not implement write`);
  }

  /** A relation's shape changed (`{ relation, added, dropped, retyped }`), before the
   * next batch that uses it. */
  // eslint-disable-next-line no-unused-vars
  applySchemaChange(change) {}
}

/** Extend and implement `process(batch)`: return nothing to keep every change, or the
 * array of indices to keep. */
export class Transform extends Plugin {
  /** As {@link Sink.prefersEncoded}; the indices `process` returns are the same. */
  static prefersEncoded = false;

  // eslint-disable-next-line no-unused-vars
  process(batch) {
    throw new Error(`${this.constructor.name} does not implement process`);
  }
}

// --- values ---------------------------------------------------------------------------

function int(v) {
  return typeof v === 'bigint' && v >= Number.MIN_SAFE_INTEGER && v <= Number.MAX_SAFE_INTEGER
    ? Number(v)
    : v;
}

/**
 * A column value (`datum`) as JavaScript: `null` (NULL), {@link UNCHANGED_TOAST}, boolean,
 * number (int2/4/8 — a BigInt beyond 2^53 — and float4/8), string (text, and numeric as
 * PostgreSQL prints it, to keep every digit), Uint8Array (bytea), or the parsed document
 * for json/jsonb.
 */
export function value(datum) {
  switch (datum.tag) {
    case 'null':
      return null;
    case 'unchanged-toast':
      return UNCHANGED_TOAST;
    case 'int':
      return int(datum.val);
    case 'json':
      return JSON.parse(datum.val);
    default:
      return datum.val;
  }
}

/** What `changes()` keeps per relation: names, key names, `schema.table`, and each
 * column name as JSON text (for {@link toJson}). */
function relationInfo(relation, id) {
  if (!relation) return { table: String(id), names: [], key: [], quoted: [], types: [], relation };
  const names = relation.columns.map((col) => col.name);
  return {
    table: `${relation.schema}.${relation.table}`,
    names,
    types: relation.columns.map((col) => col.typeOid),
    key: relation.columns.filter((col) => col.key).map((col) => col.name),
    quoted: names.map((n) => JSON.stringify(n)),
    relation,
  };
}

function rowObject(info, values) {
  if (values === undefined || values === null) return null;
  const out = {};
  for (let i = 0; i < values.length; i++) out[info.names[i] ?? `column${i}`] = value(values[i]);
  return out;
}

/**
 * One change, convenient: `op` name, `table` as `schema.table`, `key` (the key column
 * names), `old`/`new` objects by column name (`null` when absent; built when first read),
 * `lsn`/`commitLsn` (BigInt), `xid`, `commitTimeUs` (BigInt, µs since the Unix epoch),
 * `oldIsKey`; `raw` is the change as the host sent it and `relation` its relation.
 */
export class ChangeView {
  constructor(index, raw, info) {
    this.index = index;
    this.raw = raw;
    this.info = info;
  }

  get op() {
    return this.raw.op;
  }

  get table() {
    return this.info.table;
  }

  get key() {
    return this.info.key;
  }

  get relation() {
    return this.info.relation;
  }

  get old() {
    return rowObject(this.info, this.raw.old);
  }

  get new() {
    return rowObject(this.info, this.raw.new);
  }

  get lsn() {
    return this.raw.lsn;
  }

  get commitLsn() {
    return this.raw.commitLsn;
  }

  get xid() {
    return this.raw.xid;
  }

  get commitTimeUs() {
    return this.raw.commitTimeUs;
  }

  get oldIsKey() {
    return this.raw.oldIsKey;
  }

  /** The `old` / `new` row as JSON text (see {@link toJson}). */
  rowJson(which) {
    return rowJson(this.info.quoted, which === 'old' ? this.raw.old : this.raw.new);
  }
}

/**
 * A change of an encoded batch: the same getters as {@link ChangeView}, with values read
 * from the batch's buffer when first asked for; `raw` is null (there is no record per
 * change) and `header` holds the fixed fields.
 */
class EncodedChangeView extends ChangeView {
  constructor(index, header, info, reader) {
    super(index, null, info);
    this.header = header;
    this.reader = reader;
  }

  get op() {
    return this.header.op;
  }

  get old() {
    return this.header.oldAt < 0 ? null : encodedRow(this.reader, this.info, this.header.oldAt);
  }

  get new() {
    return this.header.newAt < 0 ? null : encodedRow(this.reader, this.info, this.header.newAt);
  }

  get lsn() {
    return this.header.lsn;
  }

  get commitLsn() {
    return this.header.commitLsn;
  }

  get xid() {
    return this.header.xid;
  }

  get commitTimeUs() {
    return this.header.commitTimeUs;
  }

  get oldIsKey() {
    return this.header.oldIsKey;
  }

  rowJson(which) {
    const at = which === 'old' ? this.header.oldAt : this.header.newAt;
    return at < 0 ? 'null' : encodedRowJson(this.reader, this.info, at);
  }
}

/**
 * The batch's changes as {@link ChangeView}s, in commit order — of a typed batch or of an
 * encoded one (a plugin with `static prefersEncoded = true`). A malformed encoded buffer
 * throws {@link DecodeError}.
 */
export function* changes(batch) {
  const infos = new Map(batch.relations.map((r) => [r.id, relationInfo(r, r.id)]));
  const infoOf = (id) => {
    let info = infos.get(id);
    if (!info) infos.set(id, (info = relationInfo(undefined, id)));
    return info;
  };
  if (isEncoded(batch)) {
    const reader = new Reader(batch.data);
    let at = 0;
    for (let index = 0; index < batch.count; index++) {
      const header = reader.change(at);
      at = header.end;
      yield new EncodedChangeView(index, header, infoOf(header.relation), reader);
    }
    return;
  }
  for (let index = 0; index < batch.changes.length; index++) {
    const c = batch.changes[index];
    yield new ChangeView(index, c, infoOf(c.relation));
  }
}

/** Number of changes in a typed or an encoded batch. */
export function changeCount(batch) {
  return isEncoded(batch) ? batch.count : batch.changes.length;
}

// --- values of the compact encoding (PostgreSQL's text form, by column type OID) ---------
// The same mapping as the host's for typed batches (dbmazz-sdk `encoded::datum`): bool,
// int2/4/8 and oid, float4/8, numeric, bytea, json/jsonb; everything else stays text.

/** An integer as PostgreSQL prints it. */
const INTEGER = /^-?[0-9]+$/;

/** bytea's hex output format (PostgreSQL docs, "Binary Data Types"). */
const BYTEA_HEX = /^\\x(?:[0-9a-fA-F]{2})*$/;

function hexBytes(t) {
  if (!BYTEA_HEX.test(t)) return undefined;
  const out = new Uint8Array((t.length - 2) / 2);
  for (let i = 0; i < out.length; i++) {
    const b = Number.parseInt(t.substr(2 + 2 * i, 2), 16);
    if (Number.isNaN(b)) return undefined;
    out[i] = b;
  }
  return out;
}

function encodedValue(reader, oid, kind, start, end) {
  if (kind === NULL) return null;
  if (kind === UNCHANGED) return UNCHANGED_TOAST;
  if (kind === BINARY) return reader.bytes.slice(start, end);
  const t = reader.text(start, end);
  switch (oid) {
    case 16:
      return t === 't';
    case 20:
    case 21:
    case 23:
    case 26: {
      if (!INTEGER.test(t)) return t;
      const n = Number(t);
      return Number.isSafeInteger(n) ? n : BigInt(t);
    }
    case 700:
    case 701: {
      const n = Number(t);
      return Number.isNaN(n) && t !== 'NaN' ? t : n;
    }
    case 17:
      return hexBytes(t) ?? t;
    case 114:
    case 3802:
      return JSON.parse(t);
    default: // numeric (a string keeps every digit), text and the rest
      return t;
  }
}

function encodedRow(reader, info, at) {
  const out = {};
  const types = info.types;
  reader.eachValue(at, (i, kind, start, end) => {
    out[info.names[i] ?? `column${i}`] = encodedValue(reader, types[i], kind, start, end);
  });
  return out;
}

function encodedJson(reader, oid, kind, start, end) {
  if (kind === NULL) return 'null';
  if (kind === UNCHANGED) return '{"unchanged_toast":true}';
  const b = reader.bytes;
  if (kind === BINARY) {
    let s = '"';
    for (let i = start; i < end; i++) s += HEX[b[i]];
    return s + '"';
  }
  const t = reader.text(start, end);
  switch (oid) {
    case 20:
    case 21:
    case 23:
    case 26:
      return INTEGER.test(t) ? t : JSON.stringify(t); // as PostgreSQL prints it: already JSON
    case 16:
      return t === 't' ? 'true' : 'false';
    case 700:
    case 701: {
      const n = Number(t);
      if (Number.isNaN(n) && t !== 'NaN') return JSON.stringify(t);
      return Number.isFinite(n) ? String(n) : `"${n}"`;
    }
    case 17:
      return BYTEA_HEX.test(t) ? `"${t.slice(2).toLowerCase()}"` : JSON.stringify(t);
    case 114:
    case 3802:
      return jsonText(t);
    default: // numeric, text
      return JSON.stringify(t);
  }
}

function encodedRowJson(reader, info, at) {
  let s = '{';
  const { quoted, types } = info;
  reader.eachValue(at, (i, kind, start, end) => {
    if (i > 0) s += ',';
    s += (quoted[i] ?? `"column${i}"`) + ':' + encodedJson(reader, types[i], kind, start, end);
  });
  return s + '}';
}

/** A json/jsonb value's text as it goes into a JSON line: PostgreSQL's own text of the
 * document (every digit kept), with line breaks — only possible between tokens of a
 * `json` value — turned into spaces, so that a line stays one line. */
function jsonText(t) {
  return t.includes('\n') || t.includes('\r') ? t.replace(/[\r\n]/g, ' ') : t;
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

function datumJson(d) {
  switch (d.tag) {
    case 'null':
      return 'null';
    case 'unchanged-toast':
      return '{"unchanged_toast":true}';
    case 'boolean':
      return d.val ? 'true' : 'false';
    case 'int':
      return String(d.val);
    case 'float':
      return Number.isFinite(d.val) ? String(d.val) : JSON.stringify(String(d.val));
    case 'json':
      return jsonText(d.val);
    case 'bytes': {
      let s = '"';
      for (const b of d.val) s += HEX[b];
      return s + '"';
    }
    default: // numeric, text
      return JSON.stringify(d.val);
  }
}

function rowJson(quoted, values) {
  if (values === undefined || values === null) return 'null';
  let s = '{';
  for (let i = 0; i < values.length; i++) {
    if (i > 0) s += ',';
    s += (quoted[i] ?? `"column${i}"`) + ':' + datumJson(values[i]);
  }
  return s + '}';
}

/**
 * One change (a {@link ChangeView}) as a JSON object (text): `op`, `table`, `lsn`,
 * `commit_lsn`, `xid`, `old`, `new`; int8 and LSNs with every digit, numeric as a
 * string, json/jsonb as the document, bytea as hex, a non-finite float as a string, an
 * unchanged TOAST value as `{"unchanged_toast":true}` — the same fields and values as the
 * Python SDK's `to_json` (floats formatted as JavaScript prints numbers).
 */
export function toJson(change) {
  return (
    `{"op":"${change.op}","table":${JSON.stringify(change.info.table)},"lsn":${change.lsn},` +
    `"commit_lsn":${change.commitLsn},"xid":${change.xid},"old":${change.rowJson('old')},` +
    `"new":${change.rowJson('new')}}`
  );
}

// --- logging ----------------------------------------------------------------------------

function logAt(level) {
  return (message, fields = {}) =>
    logWrite(
      level,
      String(message),
      Object.entries(fields).map(([k, v]) => [k, String(v)]),
    );
}

/** Logging into the host's log (always granted), with the plugin's name:
 * `log.info('sent', { id: batch.id })`. Under Node the events are recorded
 * (`testing.logs()`). `console.log` also works (stdout at INFO, stderr at WARN). */
export const log = {
  trace: logAt('trace'),
  debug: logAt('debug'),
  info: logAt('info'),
  warn: logAt('warn'),
  error: logAt('error'),
};

// --- the component's exports ---------------------------------------------------------------

function configFromWit(entries) {
  const values = {};
  for (const [name, v] of entries) {
    values[name] = v.tag === 'json' ? JSON.parse(v.val) : v.tag === 'integer' ? int(v.val) : v.val;
  }
  return new Config(values);
}

/** The thrown value and its stack, one string (what the host logs and shows). */
export function errorText(e) {
  if (e instanceof Error) {
    const stack = e.stack ? `\n${String(e.stack).trim()}` : '';
    return `${e.name}: ${e.message}${stack}`;
  }
  return String(e);
}

function describe(cls) {
  const m = cls.metadata ?? {};
  const keys = m.config ?? [];
  return {
    name: m.name ?? cls.name,
    version: m.version ?? '0.1.0',
    description: m.description ?? '',
    config: keys.map((k) => ({
      name: k.name,
      valueType: k.type,
      required: k.required,
      defaultValue: k.default,
      description: k.doc,
    })),
    otherKeys: keys.length === 0,
    memoryMb: m.memoryMb,
  };
}

/** A plugin instance for `init`; a failure is the thrown value's text (`init`'s error). */
function instantiate(cls, config) {
  try {
    return new cls(configFromWit(config));
  } catch (e) {
    throw errorText(e);
  }
}

/** SpiderMonkey's exception when its heap is exhausted: the string `out of memory`
 * (an `InternalError` in some paths), catchable, unlike Rust's allocation failure. */
function isOutOfMemory(e) {
  return e === 'out of memory' || (e?.name === 'InternalError' && /^out of memory/.test(e.message));
}

/**
 * Ends the call with a trap whose stderr says "out of memory": the host then knows the
 * batch did not fit (`limits.memory_mb`) and splits it, as for a Rust plugin whose
 * allocator failed. Answering `retryable` instead would retry the same batch forever.
 * The thrown value is not a `{ tag, val }` variant, so the export's glue cannot lift it
 * and traps.
 */
function outOfMemory() {
  console.error('out of memory: the batch does not fit in the JavaScript heap');
  throw new Error('out of memory');
}

function sinkError(e) {
  if (isOutOfMemory(e)) outOfMemory();
  if (e instanceof Retryable) return { tag: 'retryable', val: [e.message, e.retryAfterMs] };
  if (e instanceof Fatal) return { tag: 'fatal', val: e.message };
  if (e instanceof DeadLetter) {
    return { tag: 'dead-letter', val: e.rejected.map(([index, reason]) => ({ index, reason })) };
  }
  // anything else: transient, with the stack for the operator
  return { tag: 'retryable', val: [errorText(e), undefined] };
}

/**
 * The component's `sink-plugin` export for a {@link Sink} subclass:
 * `export const sinkPlugin = exportSink(MySink);` in the entry module.
 */
export function exportSink(cls) {
  let instance;
  const call = async (method, arg) => {
    if (!instance) throw { tag: 'fatal', val: `${method} before init` };
    try {
      await instance[method](arg);
    } catch (e) {
      throw sinkError(e);
    }
  };
  return {
    describe: () => describe(cls),
    init(config) {
      instance = instantiate(cls, config);
      return {
        preferredBatchSize: cls.metadata?.preferredBatchSize,
        needsFullRows: false,
        prefersEncoded: Boolean(cls.prefersEncoded),
      };
    },
    write: (batch) => call('write', batch),
    // the same method: changes() reads both forms
    writeEncoded: (batch) => call('write', batch),
    applySchemaChange: (change) => call('applySchemaChange', change),
  };
}

/**
 * The component's `transform-plugin` export for a {@link Transform} subclass:
 * `export const transformPlugin = exportTransform(MyTransform);`.
 */
export function exportTransform(cls) {
  let instance;
  const process = async (batch) => {
    if (!instance) throw 'process before init';
    let keep;
    try {
      keep = await instance.process(batch);
    } catch (e) {
      if (isOutOfMemory(e)) outOfMemory();
      throw errorText(e);
    }
    if (keep === undefined || keep === null) return { tag: 'keep-all' };
    return { tag: 'keep', val: [...keep].map(Number).sort((a, b) => a - b) };
  };
  return {
    describe: () => describe(cls),
    init(config) {
      instance = instantiate(cls, config);
      return { prefersEncoded: Boolean(cls.prefersEncoded) };
    },
    process,
    // the same method: changes() reads both forms
    processEncoded: process,
  };
}
