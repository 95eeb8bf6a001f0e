// Under Node (unit tests): what a component would send to the host is recorded here and
// read through `@dbmazz/sdk/testing`.

/** True inside a component, false under Node. */
export const inComponent = false;

/** The log events written since the last `testing.reset()`. */
export const recordedLogs = [];

/** Records one log event: `{ level, message, fields: [[key, value], ...] }`. */
export function logWrite(level, message, fields) {
  recordedLogs.push({ level, message, fields });
}
