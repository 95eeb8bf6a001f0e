// The component's entry module: `npm run build` makes transform-js.wasm from it.
import { exportTransform } from '@dbmazz/sdk';
import { DropWhere } from './transform.js';

export const transformPlugin = exportTransform(DropWhere);
