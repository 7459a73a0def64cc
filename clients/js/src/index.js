// mxsse-client: Matrix sync over Server-Sent Events (MSC2108).
export { SyncStream, MatrixError, detectSse, backoffDelay, SSE_FEATURE } from './stream.js';
export { createSseFetch } from './sdk.js';
