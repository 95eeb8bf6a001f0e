// The component's entry module: `npm run build` makes sink-js.wasm from it.
import { exportSink } from '@dbmazz/sdk';
import { JsonLines } from './sink.js';

export const sinkPlugin = exportSink(JsonLines);
