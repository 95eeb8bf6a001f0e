// The SDK under Node: values, JSON lines, and the adapters a component exports (what the
// host receives for each outcome). `npm test` in sdk/js.
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import {
  DeadLetter, DecodeError, Fatal, Retryable, Sink, Transform, UNCHANGED_TOAST, changeCount, changes,
  exportSink, exportTransform, key, log, toJson, value,
} from '../src/index.js';
import { BatchBuilder, config, encode, logs, reset } from '../src/testing.js';

beforeEach(reset);

const orders = () =>
  new BatchBuilder(7).table(3, 'public', 'orders', [['id', 20, true], ['amount', 1700, false], ['doc', 3802, false], ['raw', 17, false], ['f', 701, false]]);

test('values: int8 beyond 2^53 stays exact, numeric a string, json parsed, bytea bytes', () => {
  const b = orders().insert(3, [2n ** 63n - 1n, { tag: 'numeric', val: '12345678901234567890.5' }, { a: [1] }, new Uint8Array([0, 255]), NaN]).build();
  const [c] = changes(b);
  assert.equal(c.op, 'insert');
  assert.equal(c.table, 'public.orders');
  assert.deepEqual(c.key, ['id']);
  assert.equal(c.new.id, 9223372036854775807n);
  assert.equal(c.new.amount, '12345678901234567890.5');
  assert.deepEqual(c.new.doc, { a: [1] });
  assert.deepEqual(c.new.raw, new Uint8Array([0, 255]));
  assert.equal(c.old, null);
  assert.equal(value({ tag: 'int', val: 5n }), 5);
  assert.equal(value({ tag: 'unchanged-toast' }), UNCHANGED_TOAST);
});

test('toJson keeps every digit and writes what JSON cannot hold as strings', () => {
  const b = orders()
    .insert(3, [2n ** 63n - 1n, { tag: 'numeric', val: '1.10' }, { tag: 'json', val: '{"big": 123456789012345678901234567890}' }, new Uint8Array([0, 255]), Infinity])
    .update(3, [1, UNCHANGED_TOAST, null, null, 1.5], [1, null, null, null, 0])
    .build();
  const [a, u] = [...changes(b)].map(toJson);
  assert.equal(
    a,
    '{"op":"insert","table":"public.orders","lsn":4104,"commit_lsn":4104,"xid":700,"old":null,' +
      '"new":{"id":9223372036854775807,"amount":"1.10","doc":{"big": 123456789012345678901234567890},"raw":"00ff","f":"Infinity"}}',
  );
  const parsed = JSON.parse(u);
  assert.deepEqual(parsed.new, { id: 1, amount: { unchanged_toast: true }, doc: null, raw: null, f: 1.5 });
  assert.equal(parsed.old.f, 0);
});

test('a sink export answers with the error variant the host expects for each outcome', async () => {
  let outcome;
  class S extends Sink {
    static metadata = { name: 's', version: '1.2.3', memoryMb: 96, config: [key('url', 'text', { required: true, doc: 'where' }), key('n', 'integer', { default: 5 })] };
    constructor(c) {
      super(c);
      this.url = c.required('url');
      this.n = c.get('n', 5);
    }
    async write() {
      log.info('writing', { n: this.n });
      if (outcome) throw outcome;
    }
  }
  const p = exportSink(S);
  assert.deepEqual(p.describe(), {
    name: 's', version: '1.2.3', description: '', memoryMb: 96, otherKeys: false,
    config: [
      { name: 'url', valueType: 'text', required: true, defaultValue: undefined, description: 'where' },
      { name: 'n', valueType: 'integer', required: false, defaultValue: '5', description: '' },
    ],
  });
  await assert.rejects(p.write(orders().build()), (e) => e.tag === 'fatal' && /before init/.test(e.val));
  assert.throws(() => p.init([]), (e) => typeof e === 'string' && /config key url is required/.test(e));
  assert.deepEqual(p.init([['url', { tag: 'text', val: 'http://x/' }], ['n', { tag: 'integer', val: 9n }]]), {
    preferredBatchSize: undefined, needsFullRows: false, prefersEncoded: false,
  });
  const b = orders().build();
  outcome = undefined;
  assert.equal(await p.write(b), undefined);
  assert.deepEqual(logs()[0], { level: 'info', message: 'writing', fields: [['n', '9']] });
  outcome = new Retryable('busy', 250);
  await assert.rejects(p.write(b), { tag: 'retryable', val: ['busy', 250] });
  outcome = new Fatal('no table');
  await assert.rejects(p.write(b), { tag: 'fatal', val: 'no table' });
  outcome = new DeadLetter([[2, 'too long']]);
  await assert.rejects(p.write(b), { tag: 'dead-letter', val: [{ index: 2, reason: 'too long' }] });
  outcome = new TypeError('oops');
  await assert.rejects(p.write(b), (e) => e.tag === 'retryable' && e.val[0].startsWith('TypeError: oops\n') && e.val[1] === undefined);
});

test('a transform export keeps all, keeps indices in order, or reports the error', async () => {
  let answer;
  class T extends Transform {
    process() {
      if (answer instanceof Error) throw answer;
      return answer;
    }
  }
  const p = exportTransform(T);
  assert.equal(p.describe().otherKeys, true);
  assert.deepEqual(p.init([]), { prefersEncoded: false });
  const b = orders().build();
  answer = undefined;
  assert.deepEqual(await p.process(b), { tag: 'keep-all' });
  answer = new Set([3, 1]);
  assert.deepEqual(await p.process(b), { tag: 'keep', val: [1, 3] });
  answer = new Error('bad rule');
  await assert.rejects(p.process(b), (e) => typeof e === 'string' && e.startsWith('Error: bad rule'));
});

test('config: typed values, json parsed, required names the key', () => {
  const c = config({ url: 'u' });
  assert.equal(c.get('missing', 3), 3);
  assert.ok(c.has('url'));
  assert.throws(() => c.required('token'), (e) => e instanceof Fatal && /token/.test(e.message));
  assert.throws(() => key('x', 'date'), /not one of/);
});

// every column type the host maps, every op, NULL, unchanged TOAST, a key-only old row
const everything = () =>
  new BatchBuilder(9)
    .table(4, 'public', 'all', [['id', 20, true], ['ok', 16, false], ['n', 23, false], ['f', 701, false],
      ['amount', 1700, false], ['raw', 17, false], ['doc', 3802, false], ['note', 25, false]])
    .insert(4, [2n ** 63n - 1n, true, -5, 1.5, { tag: 'numeric', val: '12345678901234567890.5' },
      new Uint8Array([0, 255]), { tag: 'json', val: '{"big": 123456789012345678901234567890}' }, 'héllo "q"\n'])
    .insert(4, [-(2n ** 63n), false, 0, NaN, { tag: 'numeric', val: 'NaN' }, new Uint8Array([]), [1, 2], 'x'.repeat(100) + '€'])
    .update(4, [1, null, 7, -Infinity, null, null, null, UNCHANGED_TOAST], [1, true, 6, 0, null, null, null, 'old'])
    .delete(4, [2, null, null, null, null, null, null, null])
    .read(4, [3, true, 1, Infinity, { tag: 'numeric', val: '0.10' }, null, { tag: 'json', val: 'null' }, ''])
    .change('truncate', 4, {})
    .insert(4, [4, null, null, null, null, null, { tag: 'json', val: '{"a":\n 1}' }, null])
    .build();

test('an encoded batch reads as the same changes, values and JSON lines as the typed one', () => {
  const typed = everything();
  const enc = encode(typed);
  assert.ok(enc.data instanceof Uint8Array && enc.changes === undefined);
  assert.equal(changeCount(enc), 7);
  const a = [...changes(typed)];
  const b = [...changes(enc)];
  assert.equal(b.length, a.length);
  for (let i = 0; i < a.length; i++) {
    for (const f of ['index', 'op', 'table', 'lsn', 'commitLsn', 'xid', 'commitTimeUs', 'oldIsKey']) {
      assert.deepEqual(b[i][f], a[i][f], `change ${i} ${f}`);
    }
    assert.deepEqual(b[i].key, ['id']);
    assert.deepEqual(b[i].old, a[i].old, `change ${i} old`);
    assert.deepEqual(b[i].new, a[i].new, `change ${i} new`);
    assert.equal(toJson(b[i]), toJson(a[i]), `change ${i} JSON`);
    JSON.parse(toJson(b[i]));
  }
  assert.equal(b[0].new.id, 9223372036854775807n);
  assert.equal(b[0].new.note, 'héllo "q"\n');
  assert.equal(b[1].new.note.length, 101);
  assert.equal(b[2].new.note, UNCHANGED_TOAST);
  assert.equal(b[2].raw, null);
  assert.equal(b[5].op, 'truncate');
  assert.equal(b[5].new, null);
  // a json value's line breaks (between tokens) do not break the line
  assert.ok(!toJson(b[6]).includes('\n') && !toJson(a[6]).includes('\n'));
  assert.deepEqual(JSON.parse(toJson(b[6])).new.doc, { a: 1 });
});

test('a malformed encoded buffer is a DecodeError naming the byte', () => {
  const enc = encode(everything());
  const cut = { ...enc, data: enc.data.subarray(0, 40) };
  assert.throws(() => [...changes(cut)], (e) => e instanceof DecodeError && /at byte \d+: (truncated|value past the end)/.test(e.message));
  const badOp = { ...enc, data: Uint8Array.from(enc.data, (x, i) => (i === 0 ? 0x58 : x)) };
  assert.throws(() => [...changes(badOp)], (e) => e instanceof DecodeError && e.offset === 0 && /unknown op/.test(e.message));
});

test('a plugin that prefers the encoding says so at init and gets encoded batches in write / process', async () => {
  const seen = [];
  class S extends Sink {
    static prefersEncoded = true;
    write(batch) {
      for (const c of changes(batch)) seen.push(toJson(c));
      if (changeCount(batch) > 5) throw new DeadLetter([[5, 'no truncate here']]);
    }
  }
  const p = exportSink(S);
  assert.equal(p.init([]).prefersEncoded, true);
  const typed = everything();
  await assert.rejects(p.writeEncoded(encode(typed)), { tag: 'dead-letter', val: [{ index: 5, reason: 'no truncate here' }] });
  assert.deepEqual(seen, [...changes(typed)].map(toJson));

  class T extends Transform {
    static prefersEncoded = true;
    process(batch) {
      return [...changes(batch)].filter((c) => c.op === 'insert').map((c) => c.index);
    }
  }
  const t = exportTransform(T);
  assert.deepEqual(t.init([]), { prefersEncoded: true });
  assert.deepEqual(await t.processEncoded(encode(typed)), { tag: 'keep', val: [0, 1, 6] });
});
