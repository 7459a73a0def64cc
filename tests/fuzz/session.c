/* One fuzzed client connection: see session.h. */
#include "tests/fuzz/session.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/metrics.h"
#include "homeserver/upstream.h"
#include "tests/unit/front_fake.h"
#include "tests/unit/hub_fake.h"

static int failed_checks;

/* Answers what the hub asked the homeserver: who the token is, and a
 * few /sync batches (then the streams wait, as on a quiet account). */
static void homeserver(int *batches) {
  for (int k = 0; k < F.nreqs; k++) {
    freq *r = &F.reqs[k];
    if (!r->live)
      continue;
    if (r->path && !strcmp(r->path, WHOAMI)) {
      answer(k, 200, "{\"user_id\":\"@u:example.org\"}");
    } else if (r->path && !strcmp(r->path, JOINED)) {
      answer(k, 200, "{\"joined_rooms\":[]}");
    } else if (!r->path && *batches < 4) {
      char next[32];
      snprintf(next, sizeof(next), "s%d", ++*batches);
      answer(k, 200, batch(next));
    }
  }
}

void fz_session_run(int proto, const char *prefix, const uint8_t *data,
                    size_t size,
                    void (*check_wire)(const mx_buf *wire,
                                       const uint8_t *payload, size_t n)) {
  static struct ev_loop *uloop;
  static mx_upstream *upstream;
  if (!uloop) {
    /* Proxied requests are started and cancelled, never sent: this loop
     * never runs. */
    uloop = ev_loop_new(EVFLAG_AUTO);
    upstream = uloop ? mx_upstream_new(uloop, "http://127.0.0.1:9", NULL)
                     : NULL;
    if (!upstream)
      abort();
  }
  if (size < 2)
    return;
  uint8_t flags = data[0], seed = data[1];
  const uint8_t *in = data + 2;
  size_t n = size - 2;
  int64_t streams_before = mx_stats.streams_open;

  mx_sync_hub_opts o = hf_opts();
  hf_setup(&o, &failed_checks);
  ff_front f;
  ff_front_init(&f, loop);
  f.server.sync = hub;
  f.server.upstream = upstream;
  ff_conn *fc = ff_conn_new(&f, flags & 1, true);
  if (!fc || ff_conn_start(fc, proto) != 0)
    abort();
  if (flags & 2)
    fc->c.reject_status = 429;

  int batches = 0;
  int rv = prefix ? ff_conn_read(fc, prefix, strlen(prefix)) : 0;
  for (size_t off = 0, i = 0; off < n && rv == 0;) {
    size_t step = flags & 4 ? n : 1 + (size_t)((in[i++ % n] ^ seed) % 61);
    if (step > n - off)
      step = n - off;
    rv = ff_conn_read(fc, (const char *)in + off, step);
    off += step;
    ff_conn_flush(fc);
    spin();
    homeserver(&batches);
    spin();
  }
  ff_conn_flush(fc);
  /* A client that reads everything: take what is still queued. */
  for (int round = 0; round < 3; round++) {
    spin();
    homeserver(&batches);
    ff_conn_flush(fc);
  }
  check_wire(&fc->wire, in, n);
  ff_conn_free(fc);
  if (mx_stats.streams_open != streams_before)
    abort(); /* an exchange did not end */
  ff_front_free(&f);
  hf_teardown();
  if (failed_checks)
    abort();
}
