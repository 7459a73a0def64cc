/*
 * Random event sequences through the presence timing logic
 * (sync/presence.c), checked against a shadow model of its promises:
 *  - nothing is published while the link is down;
 *  - CLEAR comes first on every link-up;
 *  - an end only for a device started since the last CLEAR, with no
 *    stream open, 10-20 s after its last stream closed;
 *  - an open device is re-announced at most 120 s apart (starts at most
 *    spread + tick after a link-up);
 *  - a user with an open stream gets a set_state at most 45 s apart, and
 *    only while it has one; nothing is emitted after shutdown;
 *  - feed lines of any bytes are classified without harm;
 *  - nothing leaks (ASan/LSan).
 * Input: one opcode byte, then its operands (see step()).
 */
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "sync/presence.h"
#include "tests/fuzz/fuzz.h"

#define NU 3
#define ND 3
#define TICK 0.5
#define SPREAD 5.0

typedef struct shadow_dev {
  int streams[2];     /* per state */
  bool tracked;       /* known to the logic (open or closing) */
  bool published;     /* started since the last CLEAR */
  double closed_at;   /* last close */
  double last_start;  /* or the time it became due */
} shadow_dev;

typedef struct harness {
  mx_presence *p;
  double now;
  bool link;
  bool dead; /* after shutdown */
  shadow_dev dev[NU][ND];
  double last_state[NU];
  bool user_open_since_set[NU];
} harness;

static const char *users[NU] = {"@a:hs", "@b:hs", "@c:hs"};
static const char *devs[ND] = {"D0", "D1", "D2"};

static int idx(const char *s, size_t len, const char *const *names, int n) {
  for (int i = 0; i < n; i++)
    if (strlen(names[i]) == len && !memcmp(names[i], s, len))
      return i;
  abort(); /* an id nobody opened */
}

static bool user_open(const harness *h, int u) {
  for (int d = 0; d < ND; d++)
    if (h->dev[u][d].streams[0] + h->dev[u][d].streams[1])
      return true;
  return false;
}

static void on_emit(const mx_presence_action *a, void *ud) {
  harness *h = ud;
  if (h->dead)
    abort();
  if (a->kind == MX_PRESENCE_CLEAR) {
    if (!h->link)
      abort();
    for (int u = 0; u < NU; u++)
      for (int d = 0; d < ND; d++)
        h->dev[u][d].published = false;
    return;
  }
  int u = idx(a->user, a->ulen, users, NU);
  int d = idx(a->device, a->dlen, devs, ND);
  shadow_dev *s = &h->dev[u][d];
  char line[MX_PRESENCE_MAX_LINE + 1];
  switch (a->kind) {
  case MX_PRESENCE_START:
    if (!h->link || !s->tracked)
      abort();
    if (mx_presence_format(h->p, a, line, sizeof(line)) <= 0)
      abort();
    s->published = true;
    s->last_start = h->now;
    break;
  case MX_PRESENCE_END: {
    if (!h->link || !s->published || s->streams[0] + s->streams[1])
      abort();
    double waited = h->now - s->closed_at;
    if (waited < 10 || waited > 20 + TICK)
      abort();
    if (a->ms != (int64_t)(s->closed_at * 1000 + 0.5))
      abort();
    s->published = false;
    s->tracked = false;
    break;
  }
  case MX_PRESENCE_SET_STATE:
    if (!user_open(h, u) || !(s->streams[0] + s->streams[1]))
      abort();
    /* The strongest state of the user's open streams. */
    for (int o = 0; o < ND; o++)
      if (h->dev[u][o].streams[MX_PRESENCE_ONLINE] &&
          a->state != MX_PRESENCE_ONLINE)
        abort();
    h->last_state[u] = h->now;
    break;
  default:
    abort();
  }
}

static void check_deadlines(harness *h) {
  for (int u = 0; u < NU; u++) {
    if (user_open(h, u) && h->now - h->last_state[u] > 45 + TICK)
      abort();
    for (int d = 0; d < ND; d++) {
      shadow_dev *s = &h->dev[u][d];
      /* The promise is for open devices (a closing one may be dropped
       * unannounced after a link-up: the CLEAR covered it). */
      if (h->link && s->streams[0] + s->streams[1] &&
          h->now - s->last_start > 120 + TICK)
        abort();
    }
  }
}

static void tick(harness *h, double seconds) {
  for (double t = 0; t < seconds; t += TICK) {
    h->now += TICK;
    mx_presence_tick(h->p, h->now);
    /* The logic drops closing devices silently while the link is down. */
    for (int u = 0; u < NU; u++)
      for (int d = 0; d < ND; d++) {
        shadow_dev *s = &h->dev[u][d];
        if (s->tracked && !(s->streams[0] + s->streams[1]) &&
            !mx_presence_is_open(h->p, users[u], strlen(users[u]), devs[d],
                                 strlen(devs[d])) &&
            h->now - s->closed_at > 20 + TICK)
          s->tracked = s->published = false;
      }
    check_deadlines(h);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  harness h = {.now = 1000};
  mx_presence_opts o = {.instance = "fuzz", .seed = size};
  if (mx_presence_new(&h.p, &o, on_emit, &h))
    abort();
  size_t i = 0;
  while (i < size && !h.dead) {
    uint8_t op = data[i++] % 9;
    uint8_t b = i < size ? data[i++] : 0;
    int u = b % NU, d = (b / NU) % ND;
    mx_presence_state st = (b / (NU * ND)) % 2 ? MX_PRESENCE_ONLINE
                                                 : MX_PRESENCE_UNAVAILABLE;
    shadow_dev *s = &h.dev[u][d];
    switch (op) {
    case 0: {
      bool was_open = user_open(&h, u);
      bool new_dev = !s->tracked;
      s->streams[st]++;
      s->tracked = true;
      if (new_dev && h.link)
        s->last_start = h.now; /* the start is emitted inside open */
      if (mx_presence_open(h.p, users[u], strlen(users[u]), devs[d],
                           strlen(devs[d]), st, h.now) != 0)
        abort();
      if (!was_open && h.now - h.last_state[u] > 45 + TICK)
        abort(); /* an (overdue) user opening gets its set_state at once */
      break;
    }
    case 1: {
      int rv = mx_presence_close(h.p, users[u], strlen(users[u]), devs[d],
                                 strlen(devs[d]), st, h.now);
      if ((rv == 0) != (s->streams[st] > 0))
        abort();
      if (rv == 0) {
        s->streams[st]--;
        if (!(s->streams[0] + s->streams[1]))
          s->closed_at = h.now;
      }
      break;
    }
    case 2:
      tick(&h, (double)(b % 64));
      break;
    case 3:
      h.link = !h.link;
      if (h.link)
        for (int a = 0; a < NU; a++)
          for (int c = 0; c < ND; c++)
            h.dev[a][c].last_start = h.now + SPREAD - 120; /* due by spread */
      mx_presence_link(h.p, h.link, h.now);
      break;
    case 4:
      mx_presence_feed_line(h.p, "REPLICATE ", 10, h.now);
      break;
    case 5: {
      size_t n = b % 24;
      if (n > size - i)
        n = size - i;
      mx_presence_feed_line(h.p, (const char *)data + i, n, h.now);
      i += n;
      break;
    }
    case 6:
      mx_presence_set_state_failed(h.p, users[u], strlen(users[u]), h.now);
      /* Retried within set_state_retry: the 45 s promise still holds. */
      break;
    case 7:
      mx_presence_resync(h.p, h.now);
      break;
    case 8:
      if (b % 8 == 0) {
        mx_presence_shutdown(h.p);
        h.dead = true;
        memset(h.dev, 0, sizeof(h.dev));
        tick(&h, 30); /* nothing more may come out */
      }
      break;
    }
  }
  if (!h.dead)
    tick(&h, 130); /* every pending end goes out, deadlines hold */
  mx_presence_free(h.p);
  return 0;
}
