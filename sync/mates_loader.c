#include "sync/mates_loader.h"

#include <ev.h>
#include <stdlib.h>
#include <string.h>

#include "common/backoff.h"
#include "common/buf.h"
#include "common/error.h"
#include "common/list.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/strmap.h"

/* One tracked room whose member list is wanted: waiting in the queue,
 * in flight, or waiting to retry. */
typedef struct job {
  mx_mates_loader *l;
  char *room;
  size_t len;
  void *handle;   /* in flight */
  mx_list_node qnode; /* in the loader's queue */
  int attempts;
  ev_timer retry;
} job;

struct mx_mates_loader {
  struct ev_loop *loop;
  mx_sync_hub *hub;
  mx_room_index *ix;
  mx_room_mates *rm;
  mx_strmap jobs; /* room id -> job */
  mx_list queue;
  size_t queued, in_flight;
  ev_timer pump;  /* starts queued fetches from the loop */
  mx_mates_loader_stats stats;
};

void mx_mates_loader_publish(const mx_mates_loader *l) {
  mx_room_mates_stats st;
  mx_room_mates_stats_get(l->rm, &st);
  mx_stats.repl_rooms_tracked = (int64_t)st.rooms;
  mx_stats.repl_rooms_incomplete = (int64_t)st.incomplete;
  mx_stats.repl_room_memberships = (int64_t)st.memberships;
}

static void job_free(job *j) {
  mx_mates_loader *l = j->l;
  ev_timer_stop(l->loop, &j->retry);
  if (j->handle) {
    mx_sync_hub_get_cancel(l->hub, j->handle);
    l->in_flight--;
  }
  if (mx_list_linked(&j->qnode)) {
    mx_list_remove(&j->qnode);
    l->queued--;
  }
  mx_strmap_del(&l->jobs, j->room, j->len);
  free(j->room);
  free(j);
}

static void pump_soon(mx_mates_loader *l) {
  if (!ev_is_active(&l->pump)) {
    ev_timer_set(&l->pump, 0., 0.);
    ev_timer_start(l->loop, &l->pump);
  }
}

static void enqueue(job *j) {
  mx_mates_loader *l = j->l;
  if (mx_list_linked(&j->qnode) || j->handle)
    return;
  ev_timer_stop(l->loop, &j->retry);
  mx_list_push_back(&l->queue, &j->qnode);
  l->queued++;
  pump_soon(l);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  enqueue(w->data);
}

/* The fetch did not give a list: try again later, or give up (the room
 * stays incomplete until a reload). */
static void job_failed(job *j, const char *why) {
  mx_mates_loader *l = j->l;
  l->stats.failures++;
  mx_stats.repl_member_failures++;
  mx_room_mates_failed(l->rm, j->room, j->len);
  MX_LOG_WARN("replication.members_failed", "attempt=%d reason=%s",
              j->attempts, why);
  if (j->attempts >= MX_MATES_LOADER_ATTEMPTS) {
    job_free(j);
    return;
  }
  double delay = mx_backoff_delay(MX_MATES_LOADER_RETRY,
                                  MX_MATES_LOADER_RETRY_MAX, j->attempts - 1);
  ev_timer_set(&j->retry, delay, 0.);
  ev_timer_start(l->loop, &j->retry);
}

static void fetch_done(void *ud, const mx_hs_response *resp) {
  job *j = ud;
  mx_mates_loader *l = j->l;
  j->handle = NULL;
  l->in_flight--;
  pump_soon(l); /* a slot is free */
  if (resp->status != 200) {
    /* 403: the member asked has just left; another one may be asked. */
    job_failed(j, resp->status ? "status" : "transfer");
    return;
  }
  int rv = mx_room_mates_load(l->rm, j->room, j->len, resp->body, resp->len);
  mx_mates_loader_publish(l);
  if (rv == MX_ERR_LIMIT || rv == MX_ERR_NOMEM) {
    l->stats.failures++;
    mx_stats.repl_member_failures++;
    MX_LOG_WARN("replication.members_full", "room_mates over their cap");
    job_free(j); /* retrying would not fit either */
    return;
  }
  if (rv < 0) {
    job_failed(j, "body");
    return;
  }
  job_free(j);
}

static void pick_first(const char *user, size_t len, void *ud) {
  mx_ri_key *k = ud;
  if (!k->p) {
    k->p = user;
    k->len = len;
  }
}

/* Sends the request for j on behalf of one of the room's members. */
static void job_start(job *j) {
  mx_mates_loader *l = j->l;
  /* The first member the index reports (borrowed from the index, which
   * does not change before get_as returns). */
  mx_ri_key member = {0};
  mx_room_index_visit_room(l->ix, mx_room_index_visit_begin(l->ix), j->room,
                           j->len, pick_first, &member);
  j->attempts++;
  mx_hs_request req = {.call = MX_HS_JOINED_MEMBERS,
                       .room_id = j->room,
                       .room_len = j->len};
  if (member.p)
    j->handle = mx_sync_hub_get_as(l->hub, member.p, member.len, &req,
                                   fetch_done, j);
  if (!j->handle) {
    job_failed(j, member.p ? "start" : "no member");
    return;
  }
  l->in_flight++;
  l->stats.fetches++;
  mx_stats.repl_member_fetches++;
}

static void pump_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  mx_mates_loader *l = w->data;
  while (l->in_flight < MX_MATES_LOADER_CONCURRENCY) {
    mx_list_node *n = mx_list_pop_front(&l->queue);
    if (!n)
      break;
    l->queued--;
    job_start(MX_CONTAINER_OF(n, job, qnode));
  }
}

/* Wants the member list of room (a job, queued unless one is under way). */
static void want(mx_mates_loader *l, const char *room, size_t len) {
  job *j = mx_strmap_get(&l->jobs, room, len);
  if (!j) {
    j = calloc(1, sizeof(*j));
    if (!j || !(j->room = malloc(len + 1)))
      goto nomem;
    memcpy(j->room, room, len);
    j->room[len] = '\0';
    j->len = len;
    j->l = l;
    ev_init(&j->retry, retry_cb);
    j->retry.data = j;
    if (mx_strmap_put(&l->jobs, room, len, j, NULL))
      goto nomem;
  }
  j->attempts = 0;
  enqueue(j);
  return;
nomem:
  if (j)
    free(j->room);
  free(j);
  mx_room_mates_failed(l->rm, room, len);
}

void mx_mates_loader_room_hook(const char *room, size_t len, bool added,
                               void *ud) {
  mx_mates_loader *l = ud;
  if (added) {
    int rv = mx_room_mates_track(l->rm, room, len);
    if (rv == 1)
      want(l, room, len);
  } else {
    job *j = mx_strmap_get(&l->jobs, room, len);
    if (j)
      job_free(j);
    mx_room_mates_untrack(l->rm, room, len);
  }
  mx_mates_loader_publish(l);
}

static void want_again(const char *room, size_t len, void *ud) {
  want(ud, room, len);
}

void mx_mates_loader_reload_all(mx_mates_loader *l) {
  /* An answer in flight may predate the missed rows: it is let through
   * (union with what follows), the job is not queued twice. */
  mx_room_mates_reload_all(l->rm, want_again, l);
  mx_mates_loader_publish(l);
}

mx_mates_loader *mx_mates_loader_new(struct ev_loop *loop, mx_sync_hub *hub,
                                     mx_room_index *ix, mx_room_mates *rm) {
  mx_mates_loader *l = calloc(1, sizeof(*l));
  if (!l)
    return NULL;
  l->loop = loop;
  l->hub = hub;
  l->ix = ix;
  l->rm = rm;
  mx_strmap_init(&l->jobs);
  mx_list_init(&l->queue);
  ev_init(&l->pump, pump_cb);
  l->pump.data = l;
  return l;
}

static int free_job_cb(const char *k, size_t len, void *v, void *ud) {
  job *j = v;
  mx_mates_loader *l = j->l;
  ev_timer_stop(l->loop, &j->retry);
  if (j->handle)
    mx_sync_hub_get_cancel(l->hub, j->handle);
  free(j->room);
  free(j);
  return 0;
}

void mx_mates_loader_free(mx_mates_loader *l) {
  if (!l)
    return;
  ev_timer_stop(l->loop, &l->pump);
  mx_strmap_each(&l->jobs, free_job_cb, NULL);
  mx_strmap_free(&l->jobs);
  free(l);
}

void mx_mates_loader_stats_get(const mx_mates_loader *l,
                               mx_mates_loader_stats *out) {
  *out = l->stats;
  out->queued = l->queued;
  out->in_flight = l->in_flight;
}
