// Inside a component (`dbmazz-plugin-build` bundles this file under the
// `dbmazz-component` condition): the host's interfaces of contract dbmazz:plugin@0.3.0.
import { write } from 'dbmazz:plugin/log@0.3.0';

/** True inside a component, false under Node. */
export const inComponent = true;

/** One log event into the host's log (level: trace, debug, info, warn, error). */
export function logWrite(level, message, fields) {
  write(level, message, fields);
}
