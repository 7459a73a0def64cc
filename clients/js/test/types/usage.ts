// Compiled by tsc in the tests: the published types describe real usage.
import { SyncStream, MatrixError, createSseFetch, detectSse, type SyncResponse } from 'mxsse-client';

const stream = new SyncStream({
  baseUrl: 'https://matrix.example.org',
  accessToken: 'token',
  since: localStorage.getItem('since'),
  params: { filter: { room: { timeline: { limit: 20 } } }, set_presence: 'offline' },
  heartbeatInterval: 30,
  async onSync(sync: SyncResponse, id: string) {
    localStorage.setItem('since', id);
    void sync.next_batch;
  },
  onError(err) {
    if (err instanceof MatrixError && err.errcode === 'M_UNKNOWN_TOKEN') console.log(err.data);
  },
});
const done: Promise<void> = stream.start();
const pos: string | null = stream.position;
const fetchFn = createSseFetch({ heartbeatInterval: 30 });
const res: Promise<Response> = fetchFn(new URL('https://matrix.example.org/_matrix/client/v3/sync?since=s1'), {});
const n: number = fetchFn.streamStats().requests + fetchFn.stats.fromStream;
const ok: Promise<boolean> = detectSse('https://matrix.example.org');
void done; void pos; void res; void n; void ok;
