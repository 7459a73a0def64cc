// Types for mxsse-client: Matrix sync over Server-Sent Events (MSC2108).

/** The unstable feature flag a server's /versions sets when it serves the stream. */
export declare const SSE_FEATURE: 'org.matrix.msc2108';

/** A /sync answer (the parts this package reads; the rest is passed on as is). */
export interface SyncResponse {
  next_batch: string;
  [key: string]: unknown;
}

/** A Matrix error answer: the stream stops for good on 400/401/403. */
export declare class MatrixError extends Error {
  readonly name: 'MatrixError';
  /** HTTP status (for an `event: error` on the stream: 401, or 403 for M_FORBIDDEN). */
  readonly status: number;
  readonly errcode: string;
  /** The whole JSON body, e.g. {errcode, error, soft_logout}. */
  readonly data: Record<string, unknown>;
  /** Set on 429 answers (retry_after_ms or Retry-After). */
  retryAfterMs?: number;
}

export type Transport = 'sse' | 'longpoll';
export type StreamState = 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped';

export interface SyncStreamOptions {
  /** Homeserver (or mxsse) base URL, e.g. "https://matrix.example.org". */
  baseUrl: string;
  accessToken: string;
  /** A stored position (next_batch) to resume from; sent as Last-Event-ID from the first request on. */
  since?: string | null;
  /** Forwarded /sync parameters: filter (id or object), set_presence, ... */
  params?: Record<string, string | number | boolean | object | undefined | null>;
  /** Seconds between the server's heartbeats; default 30. */
  heartbeatInterval?: number;
  /** A connection without a byte for deadFactor × heartbeatInterval is dead; default 2.5. */
  deadFactor?: number;
  /** 'auto' (default) asks /versions; 'sse' or 'longpoll' force one. */
  transport?: 'auto' | Transport;
  /** timeout= of long-poll requests, in ms; default 30000. */
  longPollTimeout?: number;
  /** First reconnect delay in ms until the server sent retry: (which then replaces it), and the largest; defaults 1000, 30000. */
  minRetry?: number;
  maxRetry?: number;
  /** The fetch to use (default globalThis.fetch). */
  fetch?: typeof fetch;
  /**
   * Called for each batch, one at a time; the stream waits for a returned
   * promise and only then takes the batch's id as its position.
   */
  onSync?: (sync: SyncResponse, id: string) => void | Promise<void>;
  /** Called once with the error that stopped the stream for good. */
  onError?: (err: MatrixError | Error) => void;
  onState?: (state: StreamState) => void;
  /** Source of randomness for the jitter (tests). */
  random?: () => number;
}

export interface StreamStats {
  /** HTTP requests made (stream connections, long-polls, /versions). */
  requests: number;
  /** Response body bytes received. */
  bytes: number;
  batches: number;
  heartbeats: number;
  reconnects: number;
}

export declare class SyncStream {
  constructor(options: SyncStreamOptions);
  /** The id of the last batch onSync finished with (or the `since` given). */
  readonly position: string | null;
  /** Known once the stream has started. */
  readonly transport: Transport | null;
  readonly state: StreamState;
  /** The error that stopped the stream, if one did. */
  readonly error: MatrixError | Error | null;
  /** The server's retry: value in ms, once received. */
  readonly retry: number | null;
  readonly stats: StreamStats;
  /** Starts; resolves when the stream has stopped (stop() or a fatal error). */
  start(): Promise<void>;
  /** Stops for good. */
  stop(): Promise<void>;
}

/** Whether the server's /versions advertises org.matrix.msc2108. */
export declare function detectSse(
  baseUrl: string,
  options?: { fetch?: typeof fetch; signal?: AbortSignal },
): Promise<boolean>;

/** Reconnect delay for attempt n (1, 2, ...): min(max, base·2^(n-1)), jittered into its upper half. */
export declare function backoffDelay(attempt: number, base: number, max: number, random?: () => number): number;

export interface SseFetchOptions {
  fetch?: typeof fetch;
  heartbeatInterval?: number;
  deadFactor?: number;
  minRetry?: number;
  maxRetry?: number;
  /** 'auto' (default) asks /versions; 'sse' forces the stream; 'longpoll' passes everything through. */
  transport?: 'auto' | Transport;
}

export interface SseFetch {
  (input: string | URL | Request, init?: RequestInit): Promise<Response>;
  readonly stats: { syncRequests: number; fromStream: number; passedThrough: number; streamsOpened: number };
  /** Counters of every stream this fetch opened. */
  streamStats(): StreamStats;
  /** Closes the stream, if one is open. */
  close(): void;
}

/**
 * A fetch for matrix-js-sdk's createClient({ fetchFn }): answers
 * GET /sync?since=X from the stream, passes every other request through.
 */
export declare function createSseFetch(options?: SseFetchOptions): SseFetch;
