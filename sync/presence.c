#include "sync/presence.h"

#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/strmap.h"

typedef struct device {
  char *id;
  size_t len;
  unsigned streams;        /* open streams of this device */
  unsigned online_streams; /* of which set_presence=online */
  bool announced;          /* start published since the last CLEAR */
  double announce_at;      /* next start */
  double closed_at;        /* last stream closed (streams == 0) */
  double end_at;           /* end due (streams == 0) */
  struct device *next;
} device;

typedef struct user {
  char *id;
  size_t len;
  device *devices;
  unsigned open_devices; /* devices with streams > 0 */
  double set_state_at;   /* next set_state, while open_devices > 0 */
  struct user *prev, *next;
} user;

struct mx_presence {
  mx_presence_opts opts;
  char instance[MX_PRESENCE_MAX_INSTANCE + 1];
  size_t instance_len;
  mx_presence_emit_fn emit;
  void *ud;
  mx_strmap users;
  user *head, *tail; /* opening order: sweeps are deterministic */
  bool link_up;
  uint64_t rng;
  mx_presence_stats stats;
};

/* splitmix64: small, seedable, good enough to spread delays. */
static double uniform(mx_presence *p, double lo, double hi) {
  uint64_t z = (p->rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return lo + (hi - lo) * (double)(z >> 11) * 0x1.0p-53;
}

static int64_t to_ms(double t) { return (int64_t)llround(t * 1000.0); }

static bool bytes_ok(const char *s, size_t len, size_t max) {
  if (len == 0 || len > max)
    return false;
  for (size_t i = 0; i < len; i++)
    if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
      return false;
  return true;
}

bool mx_presence_id_ok(const char *id, size_t len, bool is_device) {
  if (!id || !bytes_ok(id, len, MX_PRESENCE_MAX_ID))
    return false;
  /* Synapse reads the device "None" as no device at all. */
  return !(is_device && len == 4 && !memcmp(id, "None", 4));
}

static void set_default(double *v, double d) {
  if (*v == 0)
    *v = d;
}

int mx_presence_new(mx_presence **out, const mx_presence_opts *opts,
                    mx_presence_emit_fn emit, void *ud) {
  if (!opts || !opts->instance || !emit)
    return MX_ERR_INVALID;
  size_t ilen = strlen(opts->instance);
  if (!bytes_ok(opts->instance, ilen, MX_PRESENCE_MAX_INSTANCE))
    return MX_ERR_INVALID;
  mx_presence_opts o = *opts;
  set_default(&o.end_delay_min, 10);
  set_default(&o.end_delay_max, 20);
  set_default(&o.announce_min, 60);
  set_default(&o.announce_max, 120);
  set_default(&o.resync_spread, 5);
  set_default(&o.set_state_interval, 45);
  set_default(&o.set_state_retry, 5);
  set_default(&o.start_delay, 2);
  set_default(&o.resync_state_spread, 20);
  if (!o.max_devices)
    o.max_devices = MX_PRESENCE_MAX_DEVICES;
  if (o.end_delay_min < 0 || o.end_delay_min > o.end_delay_max ||
      o.announce_min <= 0 || o.announce_min > o.announce_max ||
      o.resync_spread < 0 || o.resync_state_spread < 0 ||
      o.set_state_interval <= 0 || o.start_delay < 0 ||
      o.set_state_retry <= 0)
    return MX_ERR_INVALID;
  mx_presence *p = calloc(1, sizeof(*p));
  if (!p)
    return MX_ERR_NOMEM;
  p->opts = o;
  memcpy(p->instance, opts->instance, ilen + 1);
  p->instance_len = ilen;
  p->opts.instance = p->instance;
  p->emit = emit;
  p->ud = ud;
  p->rng = o.seed;
  mx_strmap_init(&p->users);
  *out = p;
  return 0;
}

static void device_free(device *d) {
  free(d->id);
  free(d);
}

static void user_free(user *u) {
  for (device *d = u->devices, *n; d; d = n) {
    n = d->next;
    device_free(d);
  }
  free(u->id);
  free(u);
}

static void forget_all(mx_presence *p) {
  for (user *u = p->head, *n; u; u = n) {
    n = u->next;
    user_free(u);
  }
  p->head = p->tail = NULL;
  mx_strmap_free(&p->users);
  mx_strmap_init(&p->users);
  p->stats.users = p->stats.devices = 0;
}

void mx_presence_free(mx_presence *p) {
  if (!p)
    return;
  forget_all(p);
  mx_strmap_free(&p->users);
  free(p);
}

static void emit(mx_presence *p, mx_presence_kind kind, const user *u,
                 const device *d, mx_presence_state state, double t) {
  mx_presence_action a = {.kind = kind, .state = state, .ms = to_ms(t)};
  if (u) {
    a.user = u->id;
    a.ulen = u->len;
  }
  if (d) {
    a.device = d->id;
    a.dlen = d->len;
  }
  switch (kind) {
  case MX_PRESENCE_START: p->stats.starts++; break;
  case MX_PRESENCE_END: p->stats.ends++; break;
  case MX_PRESENCE_CLEAR: p->stats.clears++; break;
  case MX_PRESENCE_SET_STATE: p->stats.set_states++; break;
  case MX_PRESENCE_KEEPALIVE: p->stats.keepalives++; break;
  }
  p->emit(&a, p->ud);
}

static device *find_device(const user *u, const char *id, size_t len) {
  for (device *d = u->devices; d; d = d->next)
    if (d->len == len && !memcmp(d->id, id, len))
      return d;
  return NULL;
}

static void announce(mx_presence *p, user *u, device *d, double now) {
  emit(p, MX_PRESENCE_START, u, d, MX_PRESENCE_ONLINE, now);
  d->announced = true;
  d->announce_at = now + uniform(p, p->opts.announce_min, p->opts.announce_max);
}

/* The device whose state a set_state sends: an online one if any. */
static device *state_device(const user *u) {
  device *any = NULL;
  for (device *d = u->devices; d; d = d->next) {
    if (d->online_streams)
      return d;
    if (d->streams && !any)
      any = d;
  }
  return any;
}

static void refresh_user(mx_presence *p, user *u, double now) {
  device *d = state_device(u);
  assert(d);
  emit(p, p->opts.keepalive_sync ? MX_PRESENCE_KEEPALIVE : MX_PRESENCE_SET_STATE,
       u, d, d->online_streams ? MX_PRESENCE_ONLINE : MX_PRESENCE_UNAVAILABLE,
       now);
  u->set_state_at = now + p->opts.set_state_interval;
}

int mx_presence_open(mx_presence *p, const char *uid, size_t ulen,
                     const char *did, size_t dlen, mx_presence_state state,
                     double now) {
  if (!mx_presence_id_ok(uid, ulen, false) ||
      !mx_presence_id_ok(did, dlen, true)) {
    p->stats.refused++;
    return MX_ERR_INVALID;
  }
  user *u = mx_strmap_get(&p->users, uid, ulen);
  device *d = u ? find_device(u, did, dlen) : NULL;
  if (!d && p->stats.devices >= p->opts.max_devices) {
    p->stats.refused++;
    return MX_ERR_LIMIT;
  }
  bool new_user = false;
  if (!u) {
    if (!(u = calloc(1, sizeof(*u))) || !(u->id = malloc(ulen + 1))) {
      free(u);
      return MX_ERR_NOMEM;
    }
    memcpy(u->id, uid, ulen);
    u->id[ulen] = '\0';
    u->len = ulen;
    if (mx_strmap_put(&p->users, uid, ulen, u, NULL)) {
      user_free(u);
      return MX_ERR_NOMEM;
    }
    u->prev = p->tail;
    if (p->tail)
      p->tail->next = u;
    else
      p->head = u;
    p->tail = u;
    p->stats.users++;
    u->set_state_at = now;
    new_user = true;
  }
  bool new_device = false;
  if (!d) {
    if (!(d = calloc(1, sizeof(*d))) || !(d->id = malloc(dlen + 1))) {
      free(d);
      if (new_user) {
        /* Nothing of it was published: undo. */
        mx_strmap_del(&p->users, uid, ulen);
        p->tail = u->prev;
        if (p->tail)
          p->tail->next = NULL;
        else
          p->head = NULL;
        p->stats.users--;
        user_free(u);
      }
      return MX_ERR_NOMEM;
    }
    memcpy(d->id, did, dlen);
    d->id[dlen] = '\0';
    d->len = dlen;
    d->next = u->devices;
    u->devices = d;
    p->stats.devices++;
    new_device = true;
  }
  if (d->streams++ == 0)
    u->open_devices++;
  if (state == MX_PRESENCE_ONLINE)
    d->online_streams++;
  bool refresh = u->open_devices && now >= u->set_state_at;
  if (refresh)
    refresh_user(p, u, now);
  if (new_device) {
    /* Synapse 1.163 loses a set_state racing with a USER_SYNC for a user
     * it has no presence row for (both read it from the database; the
     * later read overwrites the fresh state with a default offline one).
     * So the set_state goes first and the start follows a little later;
     * the set_state's last_sync_ts holds the device online meanwhile. */
    if (refresh)
      d->announce_at = now + p->opts.start_delay;
    else if (p->link_up)
      announce(p, u, d, now);
    else
      d->announce_at = now;
  }
  return 0;
}

int mx_presence_close(mx_presence *p, const char *uid, size_t ulen,
                      const char *did, size_t dlen, mx_presence_state state,
                      double now) {
  user *u = mx_strmap_get(&p->users, uid, ulen);
  device *d = u ? find_device(u, did, dlen) : NULL;
  if (!d || !d->streams ||
      (state == MX_PRESENCE_ONLINE && !d->online_streams) ||
      (state != MX_PRESENCE_ONLINE && d->streams == d->online_streams))
    return MX_ERR_NOTFOUND;
  if (state == MX_PRESENCE_ONLINE)
    d->online_streams--;
  if (--d->streams == 0) {
    u->open_devices--;
    d->closed_at = now;
    d->end_at = now + uniform(p, p->opts.end_delay_min, p->opts.end_delay_max);
  }
  return 0;
}

static void unlink_user(mx_presence *p, user *u) {
  mx_strmap_del(&p->users, u->id, u->len);
  if (u->prev)
    u->prev->next = u->next;
  else
    p->head = u->next;
  if (u->next)
    u->next->prev = u->prev;
  else
    p->tail = u->prev;
  p->stats.users--;
  user_free(u);
}

void mx_presence_tick(mx_presence *p, double now) {
  for (user *u = p->head, *un; u; u = un) {
    un = u->next;
    for (device **dp = &u->devices; *dp;) {
      device *d = *dp;
      if (!d->streams && now >= d->end_at) {
        /* Unannounced (link down since): the next CLEAR covers it. */
        if (p->link_up && d->announced)
          emit(p, MX_PRESENCE_END, u, d, MX_PRESENCE_ONLINE, d->closed_at);
        *dp = d->next;
        device_free(d);
        p->stats.devices--;
        continue;
      }
      if (p->link_up && now >= d->announce_at)
        announce(p, u, d, now);
      dp = &d->next;
    }
    if (!u->devices)
      unlink_user(p, u);
    else if (u->open_devices && now >= u->set_state_at)
      refresh_user(p, u, now);
  }
}

/* Every device's start within resync_spread from now: sooner than
 * planned (resync), or in place of starts that fell due while the link
 * was down (link_up: they would otherwise all go out in one burst).
 * After a resync every open user's set_state too, spread over
 * resync_state_spread: a restarted Synapse gives each user it reloads a
 * pseudo-device that times out 30 s after the user's last sync, taking
 * the user offline unless a set_state created the real device's state
 * by then (seen on the bed: offline 34 s after a restart with starts
 * alone); Synapse's timeout checks begin 30 s after it starts. */
static void schedule_resync(mx_presence *p, double now, bool link_up) {
  for (user *u = p->head; u; u = u->next) {
    for (device *d = u->devices; d; d = d->next) {
      double at = now + uniform(p, 0, p->opts.resync_spread);
      if (link_up || at < d->announce_at)
        d->announce_at = at;
    }
    if (!link_up) {
      double at = now + uniform(p, 0, p->opts.resync_state_spread);
      if (at < u->set_state_at)
        u->set_state_at = at;
    }
  }
}

void mx_presence_link(mx_presence *p, bool up, double now) {
  if (p->link_up == up)
    return;
  p->link_up = up;
  if (!up)
    return;
  emit(p, MX_PRESENCE_CLEAR, NULL, NULL, MX_PRESENCE_ONLINE, now);
  for (user *u = p->head; u; u = u->next)
    for (device *d = u->devices; d; d = d->next)
      d->announced = false;
  schedule_resync(p, now, true);
}

void mx_presence_resync(mx_presence *p, double now) {
  p->stats.resyncs++;
  schedule_resync(p, now, false);
}

/* Splits off the next space-separated word of [*s, end). */
static bool next_word(const char **s, const char *end, const char **w,
                      size_t *wl) {
  const char *sp = memchr(*s, ' ', (size_t)(end - *s));
  *w = *s;
  *wl = (size_t)((sp ? sp : end) - *s);
  *s = sp ? sp + 1 : end;
  return *wl > 0;
}

mx_presence_line mx_presence_classify(const mx_presence *p, const char *line,
                                      size_t len) {
  const char *s = line, *end = line + len, *w, *inst;
  size_t wl, il;
  if (!next_word(&s, end, &w, &wl))
    return MX_PRESENCE_LINE_OTHER;
  if (wl == 9 && !memcmp(w, "REPLICATE", 9))
    return MX_PRESENCE_LINE_REPLICATE;
  bool user_sync = wl == 9 && !memcmp(w, "USER_SYNC", 9);
  bool clear = wl == 15 && !memcmp(w, "CLEAR_USER_SYNC", 15);
  if (!user_sync && !clear)
    return MX_PRESENCE_LINE_OTHER;
  /* CLEAR_USER_SYNC's argument is the rest of the line. */
  if (clear) {
    inst = s;
    il = (size_t)(end - s);
  } else if (!next_word(&s, end, &inst, &il)) {
    return MX_PRESENCE_LINE_FOREIGN;
  }
  return il == p->instance_len && !memcmp(inst, p->instance, il)
             ? MX_PRESENCE_LINE_ECHO
             : MX_PRESENCE_LINE_FOREIGN;
}

mx_presence_line mx_presence_feed_line(mx_presence *p, const char *line,
                                       size_t len, double now) {
  mx_presence_line kind = mx_presence_classify(p, line, len);
  switch (kind) {
  case MX_PRESENCE_LINE_REPLICATE:
    p->stats.replicates++;
    mx_presence_resync(p, now);
    break;
  case MX_PRESENCE_LINE_ECHO: p->stats.echoes++; break;
  case MX_PRESENCE_LINE_FOREIGN: p->stats.foreign++; break;
  case MX_PRESENCE_LINE_OTHER: break;
  }
  return kind;
}

void mx_presence_set_state_failed(mx_presence *p, const char *uid,
                                  size_t ulen, double now) {
  p->stats.set_state_failures++;
  user *u = mx_strmap_get(&p->users, uid, ulen);
  if (u && now + p->opts.set_state_retry < u->set_state_at)
    u->set_state_at = now + p->opts.set_state_retry;
}

void mx_presence_shutdown(mx_presence *p) {
  if (p->link_up)
    emit(p, MX_PRESENCE_CLEAR, NULL, NULL, MX_PRESENCE_ONLINE, 0);
  p->link_up = false;
  forget_all(p);
}

int mx_presence_format(const mx_presence *p, const mx_presence_action *a,
                       char *buf, size_t cap) {
  int n;
  switch (a->kind) {
  case MX_PRESENCE_CLEAR:
    n = snprintf(buf, cap, "CLEAR_USER_SYNC %s", p->instance);
    break;
  case MX_PRESENCE_START:
  case MX_PRESENCE_END:
    n = snprintf(buf, cap, "USER_SYNC %s %.*s %.*s %s %" PRId64, p->instance,
                 (int)a->ulen, a->user, (int)a->dlen, a->device,
                 a->kind == MX_PRESENCE_START ? "start" : "end", a->ms);
    break;
  default:
    return MX_ERR_INVALID;
  }
  if (n < 0 || (size_t)n >= cap)
    return MX_ERR_LIMIT;
  return n;
}

const char *mx_presence_instance(const mx_presence *p) { return p->instance; }

const mx_presence_stats *mx_presence_stats_get(const mx_presence *p) {
  return &p->stats;
}

bool mx_presence_is_open(const mx_presence *p, const char *uid, size_t ulen,
                         const char *did, size_t dlen) {
  user *u = mx_strmap_get(&p->users, uid, ulen);
  device *d = u ? find_device(u, did, dlen) : NULL;
  return d && d->streams > 0;
}
