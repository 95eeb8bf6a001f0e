// A transform that drops the changes whose row has `column` equal to `equals` (for
// example test traffic: `column = "status", equals = "test"`); every other change goes on.
import { Transform, changeCount, changes, key } from '@dbmazz/sdk';

export class DropWhere extends Transform {
  // the compact encoding: one buffer per batch instead of an object per value
  static prefersEncoded = true;

  static metadata = {
    name: 'transform-js',
    version: '0.1.0',
    description: 'drops changes whose row has column = value',
    config: [
      key('column', 'text', { required: true, doc: 'the column to compare' }),
      key('equals', 'text', { required: true, doc: "drop the change when the column's text equals this" }),
    ],
  };

  constructor(config) {
    super(config);
    this.column = config.required('column');
    this.equals = config.required('equals');
  }

  process(batch) {
    const keep = [];
    for (const c of changes(batch)) {
      const row = c.new ?? c.old;
      if (row && this.column in row && String(row[this.column]) === this.equals) continue;
      keep.push(c.index);
    }
    // nothing returned keeps the whole batch without sending indices back
    return keep.length === changeCount(batch) ? undefined : keep;
  }
}
