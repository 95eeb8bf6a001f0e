// Unit tests under Node: `npm test` (no wasm, no host, no database).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { BatchBuilder, config, encode } from '@dbmazz/sdk/testing';
import { DropWhere } from '../transform.js';

const batch = () =>
  new BatchBuilder(1)
    .table(1, 'public', 'orders', [['id', 23, true], ['status', 25, false]])
    .insert(1, [1, 'ok'])
    .insert(1, [2, 'test'])
    .delete(1, [3, 'test'])
    .update(1, [4, 'ok'])
    .build();

test('drops the matching changes and keeps the rest in order, typed or encoded', () => {
  const t = new DropWhere(config({ column: 'status', equals: 'test' }));
  assert.deepEqual(t.process(batch()), [0, 3]);
  assert.deepEqual(t.process(encode(batch())), [0, 3]);
});

test('keeps the whole batch when nothing matches', () => {
  const t = new DropWhere(config({ column: 'status', equals: 'nope' }));
  assert.equal(t.process(encode(batch())), undefined);
});
